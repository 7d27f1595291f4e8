//! What a model expects as input and gives as output: the part the ONNX graph does not say.
//! Built-in presets ([`super::builtin`]) cover the models kafray knows by name; any other model takes a
//! `NAME.toml` beside `NAME.onnx`.
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Memory layout of the model's input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Nchw,
    Nhwc,
}

/// Colour space of the model's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Gray,
    Rgb,
}

impl Color {
    pub fn channels(self) -> usize {
        match self {
            Color::Gray => 1,
            Color::Rgb => 3,
        }
    }
}

/// How an image of another size becomes the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Resize {
    /// Scale each side to the input size; the aspect ratio is not kept.
    #[default]
    Squash,
    /// Scale the shorter side to `resize_to`, then cut the input size from the centre: how
    /// torchvision evaluates its ImageNet models (resize 256, centre crop 224).
    Crop,
}

/// What the model's first output holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OutputKind {
    /// Unnormalised scores; kafray applies softmax.
    #[default]
    Logits,
    /// Already probabilities; used as they are.
    Probabilities,
}

/// `NAME.toml` beside `NAME.onnx`. Every field is optional: what is missing is taken
/// from the graph or from kafray's defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelToml {
    /// `nchw` or `nhwc`.
    pub layout: Option<Layout>,
    /// Input height in pixels.
    pub height: Option<usize>,
    /// Input width in pixels.
    pub width: Option<usize>,
    /// `gray` or `rgb`.
    pub color: Option<Color>,
    /// Each pixel (0..255) is multiplied by this first; `1.0` feeds raw values, `0.00392157` gives x/255.
    pub scale: Option<f32>,
    /// Subtracted per channel after scaling.
    pub mean: Option<Vec<f32>>,
    /// Divided per channel after the mean.
    pub std: Option<Vec<f32>>,
    /// Class names, one per line (`.txt`) or a JSON array (`.json`); relative to the TOML.
    pub labels: Option<PathBuf>,
    /// `logits` (default) or `probabilities`.
    pub output: Option<OutputKind>,
    /// `squash` (default: each side to the input size) or `crop` (shorter side to `resize_to`,
    /// then the centre).
    pub resize: Option<Resize>,
    /// With `crop`: the shorter side's length before the crop. Default: the input's longer
    /// side / 0.875 (256 for 224x224, as torchvision's ImageNet evaluation).
    pub resize_to: Option<usize>,
    /// A JPEG frame at least twice the size the resize needs is decoded at 1/2, 1/4 or 1/8 of
    /// its size in the DCT domain (libjpeg-turbo), then resized as any other: much less work for
    /// a camera frame, and a tensor a little different from a full decode's (docs/reference.md,
    /// "Decoding camera frames"). `false` always decodes in full, for bit-exact preprocessing.
    /// Default: `true`.
    pub jpeg_draft: Option<bool>,
}

impl ModelToml {
    /// These fields, and `base`'s where these have none.
    fn over(self, base: ModelToml) -> ModelToml {
        ModelToml {
            layout: self.layout.or(base.layout),
            height: self.height.or(base.height),
            width: self.width.or(base.width),
            color: self.color.or(base.color),
            scale: self.scale.or(base.scale),
            mean: self.mean.or(base.mean),
            std: self.std.or(base.std),
            labels: self.labels.or(base.labels),
            output: self.output.or(base.output),
            resize: self.resize.or(base.resize),
            resize_to: self.resize_to.or(base.resize_to),
            jpeg_draft: self.jpeg_draft.or(base.jpeg_draft),
        }
    }
}

/// The resolved description of a model's input and output.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub layout: Layout,
    pub height: usize,
    pub width: usize,
    pub color: Color,
    pub scale: f32,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub labels: Option<Vec<String>>,
    pub output: OutputKind,
    pub resize: Resize,
    /// With [`Resize::Crop`]: the shorter side before the centre crop.
    pub resize_to: usize,
    /// Whether a large JPEG may be decoded at a smaller scale ([`ModelToml::jpeg_draft`]).
    pub jpeg_draft: bool,
}

impl ModelSpec {
    pub fn channels(&self) -> usize {
        self.color.channels()
    }

    /// The least size a decoded frame must keep for this model's resize; `None` where frames
    /// are always decoded in full (`jpeg_draft = false`).
    pub fn min_decoded_size(&self) -> Option<crate::frame::MinSize> {
        use crate::frame::MinSize;
        let min = match self.resize {
            Resize::Squash => MinSize::Each { width: self.width as u32, height: self.height as u32 },
            Resize::Crop => MinSize::ShortSide(self.resize_to as u32),
        };
        self.jpeg_draft.then_some(min)
    }

    /// Number of f32 values one image takes in the input tensor.
    pub fn input_len(&self) -> usize {
        self.channels() * self.height * self.width
    }

    pub fn input_shape(&self, batch: usize) -> [usize; 4] {
        match self.layout {
            Layout::Nchw => [batch, self.channels(), self.height, self.width],
            Layout::Nhwc => [batch, self.height, self.width, self.channels()],
        }
    }

    pub fn label(&self, class: usize) -> Option<&str> {
        self.labels.as_ref()?.get(class).map(String::as_str)
    }
}

/// The input dimensions the graph declares: `[batch, d1, d2, d3]`, -1 where dynamic.
pub type GraphInput = Vec<i64>;

/// Resolves a model's spec: TOML beside the model, else a preset, then the graph's input shape.
pub fn resolve(model_path: &Path, graph_input: &GraphInput) -> Result<ModelSpec> {
    let stem = model_path.file_stem().and_then(|s| s.to_str()).unwrap_or("model").to_string();
    let toml_path = model_path.with_extension("toml");
    let (given, base_dir) = given_spec(model_path)?;
    let fail = |what: &str| {
        Error::model(
            model_path,
            format!(
                "cannot work out {what} from the graph (input shape {graph_input:?}); \
                 write {} with e.g.\n  layout = \"nchw\"   # or \"nhwc\"\n  height = 224\n  width = 224\n  \
                 color = \"rgb\"    # or \"gray\"\n  scale = 0.00392157\n  mean = [0.485, 0.456, 0.406]\n  \
                 std = [0.229, 0.224, 0.225]\n  labels = \"classes.txt\"",
                toml_path.display()
            ),
        )
    };
    if graph_input.len() != 4 {
        return Err(fail("an image input (expected a 4-d input)"));
    }
    let dim = |i: usize| (graph_input[i] > 0).then_some(graph_input[i] as usize);
    let is_chan = |d: Option<usize>| matches!(d, Some(1) | Some(3));
    let layout = match given.layout {
        Some(l) => l,
        None if is_chan(dim(1)) && !is_chan(dim(3)) => Layout::Nchw,
        None if is_chan(dim(3)) && !is_chan(dim(1)) => Layout::Nhwc,
        None => return Err(fail("the layout")),
    };
    let (c, h, w) = match layout {
        Layout::Nchw => (dim(1), dim(2), dim(3)),
        Layout::Nhwc => (dim(3), dim(1), dim(2)),
    };
    let height = given.height.or(h).ok_or_else(|| fail("the input height"))?;
    let width = given.width.or(w).ok_or_else(|| fail("the input width"))?;
    let color = match (given.color, c) {
        (Some(color), _) => color,
        (None, Some(1)) => Color::Gray,
        (None, Some(3)) => Color::Rgb,
        _ => return Err(fail("the colour (gray or rgb)")),
    };
    let check = |what: &str, graph: Option<usize>, spec: usize| match graph {
        Some(g) if g != spec => {
            Err(Error::model(model_path, format!("{what} is {spec} in the spec but {g} in the graph")))
        }
        _ => Ok(()),
    };
    check("channel count", c, color.channels())?;
    check("height", h, height)?;
    check("width", w, width)?;
    if given.scale.is_none() && given.mean.is_none() {
        tracing::warn!(
            model = %model_path.display(),
            "no normalisation given: assuming x/255; put scale/mean/std in {} if the model expects otherwise",
            toml_path.display()
        );
    }
    let channels = color.channels();
    let per_channel = |what: &str, v: Option<Vec<f32>>, default: f32| -> Result<Vec<f32>> {
        let v = v.unwrap_or_else(|| vec![default; channels]);
        match v.len() {
            1 => Ok(vec![v[0]; channels]),
            n if n == channels => Ok(v),
            n => Err(Error::model(&toml_path, format!("{what} has {n} values; the model has {channels} channels"))),
        }
    };
    let mean = per_channel("mean", given.mean, 0.0)?;
    let std = per_channel("std", given.std, 1.0)?;
    if std.contains(&0.0) {
        return Err(Error::model(&toml_path, "std must not be zero"));
    }
    let labels = match given.labels {
        Some(file) => {
            let path = base_dir.map(|d| d.join(&file)).unwrap_or(file);
            Some(load_labels(&path)?)
        }
        None => None,
    };
    let resize_to = given.resize_to.unwrap_or((height.max(width) as f64 / 0.875).round() as usize);
    if resize_to < height.max(width) {
        return Err(Error::model(
            &toml_path,
            format!("resize_to {resize_to} is smaller than the input ({height}x{width}); the crop would not fit"),
        ));
    }
    Ok(ModelSpec {
        resize: given.resize.unwrap_or_default(),
        resize_to,
        jpeg_draft: given.jpeg_draft.unwrap_or(true),
        name: stem,
        layout,
        height,
        width,
        color,
        scale: given.scale.unwrap_or(1.0 / 255.0),
        mean,
        std,
        labels,
        output: given.output.unwrap_or_default(),
    })
}

/// What is said of a model beside its graph: its TOML, else its preset, else nothing; and the
/// folder its labels path is relative to.
fn given_spec(model_path: &Path) -> Result<(ModelToml, Option<PathBuf>)> {
    let stem = model_path.file_stem().and_then(|s| s.to_str()).unwrap_or("model");
    let toml_path = model_path.with_extension("toml");
    Ok(if toml_path.is_file() {
        let text = std::fs::read_to_string(&toml_path).map_err(|e| Error::io(toml_path.display().to_string(), e))?;
        let parsed: ModelToml = toml::from_str(&text).map_err(|e| Error::model(&toml_path, e.to_string()))?;
        // Beside a preset's file, the TOML changes the fields it names and keeps the preset's others.
        let merged = match super::builtin::preset(stem) {
            Some(base) => parsed.over(base),
            None => parsed,
        };
        (merged, toml_path.parent().map(Path::to_path_buf))
    } else if let Some(p) = super::builtin::preset(stem) {
        (p, model_path.parent().map(Path::to_path_buf))
    } else {
        (ModelToml::default(), None)
    })
}

/// The files a model needs beside its `.onnx`, as paths relative to the model's folder: its
/// TOML (if any) and the labels file the TOML or the preset names. Shipping a model to a host
/// that has no copy means shipping these too.
pub fn companion_files(model_path: &Path) -> Result<Vec<PathBuf>> {
    let toml_path = model_path.with_extension("toml");
    let mut files = Vec::new();
    if toml_path.is_file() {
        files.push(PathBuf::from(toml_path.file_name().expect("a file name")));
    }
    if let Some(labels) = given_spec(model_path)?.0.labels {
        let beside = labels.components().all(|c| matches!(c, std::path::Component::Normal(_)));
        if !beside {
            return Err(Error::model(
                &toml_path,
                format!("labels {labels:?} must be a path inside the model's folder to ship the model to other hosts"),
            ));
        }
        files.push(labels);
    }
    Ok(files)
}

/// Reads class names: a JSON array of strings, or one name per line.
pub fn load_labels(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("label file {}", path.display()), e))?;
    if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str(&text)
            .map_err(|e| Error::model(path, format!("labels must be a JSON array of strings: {e}")))
    } else {
        Ok(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mnist_preset_feeds_raw_gray_pixels() {
        let spec = resolve(Path::new("/nowhere/mnist_cnn.onnx"), &vec![-1, 1, 28, 28]).unwrap();
        assert_eq!((spec.layout, spec.color, spec.height, spec.width), (Layout::Nchw, Color::Gray, 28, 28));
        assert_eq!(spec.scale, 1.0);
        assert_eq!(spec.input_len(), 784);
    }

    #[test]
    fn unknown_model_takes_layout_from_graph() {
        let spec = resolve(Path::new("/nowhere/other.onnx"), &vec![-1, 64, 64, 3]).unwrap();
        assert_eq!((spec.layout, spec.color, spec.height, spec.width), (Layout::Nhwc, Color::Rgb, 64, 64));
        assert!((spec.scale - 1.0 / 255.0).abs() < 1e-9);
    }

    #[test]
    fn ambiguous_graph_names_the_toml_to_write() {
        let err = resolve(Path::new("/nowhere/odd.onnx"), &vec![-1, -1, -1, -1]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("/nowhere/odd.toml") && text.contains("layout = "), "{text}");
    }

    #[test]
    fn toml_beside_model_wins_and_rejects_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.onnx");
        std::fs::write(dir.path().join("labels.txt"), "a\nb\n").unwrap();
        std::fs::write(
            dir.path().join("m.toml"),
            "layout='nhwc'\ncolor='gray'\nheight=8\nwidth=8\nscale=1.0\nlabels='labels.txt'\n",
        )
        .unwrap();
        let spec = resolve(&model, &vec![-1, -1, -1, -1]).unwrap();
        assert_eq!((spec.layout, spec.color, spec.height), (Layout::Nhwc, Color::Gray, 8));
        assert_eq!(spec.label(1), Some("b"));

        std::fs::write(dir.path().join("m.toml"), "layot='nhwc'\n").unwrap();
        let err = resolve(&model, &vec![-1, 8, 8, 1]).unwrap_err().to_string();
        assert!(err.contains("unknown field `layot`"), "{err}");
    }

    #[test]
    fn spec_must_agree_with_graph() {
        let err = resolve(Path::new("/x/mnist_cnn.onnx"), &vec![-1, 3, 28, 28]).unwrap_err().to_string();
        assert!(err.contains("channel count"), "{err}");
    }

    /// A TOML beside a preset's file (say, to squash instead of crop) keeps the preset's
    /// normalisation and labels rather than falling back to x/255 and no labels.
    #[test]
    fn a_toml_beside_a_preset_changes_only_the_fields_it_names() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("mobilenet_v2_imagenet.onnx");
        std::fs::write(dir.path().join("mobilenet_v2_imagenet.toml"), "resize = 'squash'\n").unwrap();
        std::fs::write(dir.path().join("imagenet_classes.txt"), "tench\ngoldfish\n").unwrap();
        let spec = resolve(&model, &vec![-1, 3, 224, 224]).unwrap();
        assert_eq!(spec.resize, Resize::Squash);
        assert_eq!(
            (spec.mean.as_slice(), spec.std.as_slice()),
            ([0.485, 0.456, 0.406].as_slice(), [0.229, 0.224, 0.225].as_slice())
        );
        assert_eq!(spec.labels, Some(vec!["tench".to_string(), "goldfish".to_string()]));
    }

    #[test]
    fn imagenet_presets_crop_as_torchvision_and_a_toml_can_say_so_too() {
        for name in ["mobilenet_v2_imagenet", "efficientnet_lite0_imagenet"] {
            assert_eq!(super::super::builtin::preset(name).unwrap().resize, Some(Resize::Crop), "{name}");
        }
        assert_eq!(super::super::builtin::preset("mnist_cnn").unwrap().resize, None, "digits fill their frame: squash");
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.onnx");
        std::fs::write(dir.path().join("m.toml"), "resize='crop'\n").unwrap();
        let spec = resolve(&model, &vec![-1, 3, 224, 224]).unwrap();
        assert_eq!((spec.resize, spec.resize_to), (Resize::Crop, 256));
        std::fs::write(dir.path().join("m.toml"), "resize='crop'\nresize_to=200\n").unwrap();
        let err = resolve(&model, &vec![-1, 3, 224, 224]).unwrap_err().to_string();
        assert!(err.contains("resize_to 200 is smaller than the input"), "{err}");
        std::fs::write(dir.path().join("m.toml"), "layout='nchw'\n").unwrap();
        assert_eq!(resolve(&model, &vec![-1, 3, 224, 224]).unwrap().resize, Resize::Squash);
    }

    #[test]
    fn companion_files_are_the_toml_and_its_labels_or_the_presets() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.onnx");
        assert!(companion_files(&model).unwrap().is_empty());
        std::fs::write(dir.path().join("m.toml"), "labels='names/classes.txt'\n").unwrap();
        assert_eq!(companion_files(&model).unwrap(), [PathBuf::from("m.toml"), PathBuf::from("names/classes.txt")]);
        std::fs::write(dir.path().join("m.toml"), "labels='../classes.txt'\n").unwrap();
        assert!(companion_files(&model).unwrap_err().to_string().contains("inside the model's folder"));
        let preset = companion_files(Path::new("/x/mobilenet_v2_imagenet.onnx")).unwrap();
        assert_eq!(preset, [PathBuf::from("imagenet_classes.txt")]);
    }
}
