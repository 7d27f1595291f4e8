//! Where things are in a kafray checkout: models (built-in names, `assets/models`,
//! `../shared/assets/models`, `$KAFRAY_MODELS`) and the ONNX Runtime library of the project's
//! `.venv`. The engine takes explicit paths; the CLI and the Python package use this to find them.
use kafray::error::{Error, Result};
use std::path::{Path, PathBuf};

pub const MODEL_ALIASES: &[(&str, &str)] = &[
    ("mnist", "mnist_cnn.onnx"),
    ("mobilenet_v2", "mobilenet_v2_imagenet.onnx"),
    ("efficientnet_lite0", "efficientnet_lite0_imagenet.onnx"),
];

/// Finds a model by path or alias. Aliases are looked up in `$KAFRAY_MODELS`, `assets/models`
/// and `../shared/assets/models` (relative to the working directory and to the executable).
pub fn find_model(name: &str) -> Result<PathBuf> {
    let path = Path::new(name);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let file = MODEL_ALIASES
        .iter()
        .find(|(alias, _)| *alias == name)
        .map(|(_, file)| *file)
        .or_else(|| (path.components().count() == 1).then_some(name))
        .ok_or_else(|| Error::model(path, "no such file"))?;
    let dirs = model_dirs();
    dirs.iter().map(|d| d.join(file)).find(|p| p.is_file()).ok_or_else(|| {
        let aliases: Vec<&str> = MODEL_ALIASES.iter().map(|(a, _)| *a).collect();
        Error::model(
            path,
            format!(
                "not a file, and {file} is in none of {dirs:?}; give a path to an .onnx file, \
                 one of the names {aliases:?}, or set KAFRAY_MODELS to the folder holding it"
            ),
        )
    })
}

fn model_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.push(cwd);
    }
    // target/release/kafray -> the checkout it was built in.
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("KAFRAY_MODELS").map(PathBuf::from).into_iter().collect();
    for root in roots {
        for sub in ["assets/models", "../shared/assets/models"] {
            let d = root.join(sub);
            if d.is_dir() && !dirs.iter().any(|x| same_dir(x, &d)) {
                dirs.push(d);
            }
        }
    }
    dirs
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The `libonnxruntime.so` of the project's `.venv` (next to the working directory or the
/// executable), if there is one.
pub fn venv_runtime_library() -> Option<PathBuf> {
    let mut roots: Vec<PathBuf> = std::env::current_dir().into_iter().collect();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    for root in roots {
        let lib = root.join(".venv/lib");
        let Ok(entries) = std::fs::read_dir(&lib) else { continue };
        for py in entries.flatten() {
            let capi = py.path().join("site-packages/onnxruntime/capi");
            if let Ok(files) = std::fs::read_dir(&capi) {
                let mut found: Vec<PathBuf> = files
                    .flatten()
                    .map(|f| f.path())
                    .filter(|p| {
                        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("libonnxruntime.so"))
                    })
                    .collect();
                found.sort();
                if let Some(p) = found.pop() {
                    return Some(p);
                }
            }
        }
    }
    None
}

/// Tells the engine to load the `.venv`'s ONNX Runtime when `ORT_DYLIB_PATH` is not set.
pub fn use_venv_runtime() {
    if let Some(lib) = venv_runtime_library() {
        kafray::model::use_runtime_library(lib);
    }
}
