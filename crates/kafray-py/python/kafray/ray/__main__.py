import sys

from kafray.ray.cli import main

sys.exit(main())
