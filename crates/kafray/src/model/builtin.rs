//! The models kafray knows by name, in one table: the name `--model` takes, the file it is looked
//! up as, and what its graph does not say (its preset, under any `NAME.toml` beside the file).
//! The CLI, the Python package and the Ray driver all resolve names here.
use super::spec::{Color, Layout, ModelToml, OutputKind, Resize};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// One built-in model.
pub struct BuiltinModel {
    /// What `--model` takes.
    pub name: &'static str,
    /// The file looked for in the model folders ([`find_model`]).
    pub file: &'static str,
    preset: fn() -> ModelToml,
}

/// Every built-in model.
pub const BUILTIN_MODELS: &[BuiltinModel] = &[
    BuiltinModel { name: "mnist", file: "mnist_cnn.onnx", preset: mnist },
    BuiltinModel { name: "mobilenet_v2", file: "mobilenet_v2_imagenet.onnx", preset: imagenet },
    BuiltinModel { name: "efficientnet_lite0", file: "efficientnet_lite0_imagenet.onnx", preset: imagenet },
    // A deliberately cheap stand-in for a model on a GPU, for benchmarks of the pipeline itself
    // (assets/models/make_pool_linear.py says how it was made).
    BuiltinModel { name: "pool_linear", file: "pool_linear_imagenet.onnx", preset: pool_linear },
];

const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// The MNIST CNN shipped in `assets/models`. Its normalisation (0.1307/0.3081) is inside the
/// graph: it takes raw 0..255 values.
fn mnist() -> ModelToml {
    ModelToml {
        layout: Some(Layout::Nchw),
        height: Some(28),
        width: Some(28),
        color: Some(Color::Gray),
        scale: Some(1.0),
        mean: Some(vec![0.0]),
        std: Some(vec![1.0]),
        labels: None,
        output: Some(OutputKind::Logits),
        // Digits fill their frame: squash.
        resize: None,
        resize_to: None,
        jpeg_draft: None,
    }
}

/// torchvision's ImageNet classifiers, as they were evaluated: shorter side to 256, the centre
/// 224x224, ImageNet's mean and std.
fn imagenet() -> ModelToml {
    ModelToml {
        layout: Some(Layout::Nchw),
        height: Some(224),
        width: Some(224),
        color: Some(Color::Rgb),
        scale: Some(1.0 / 255.0),
        mean: Some(IMAGENET_MEAN.to_vec()),
        std: Some(IMAGENET_STD.to_vec()),
        labels: Some(PathBuf::from("imagenet_classes.txt")),
        output: Some(OutputKind::Logits),
        resize: Some(Resize::Crop),
        resize_to: None,
        jpeg_draft: None,
    }
}

/// ImageNet's input, but no labels beside it in `assets/models`: its classes are numbers (it is
/// not trained: the class follows the mean colour).
fn pool_linear() -> ModelToml {
    ModelToml { labels: None, ..imagenet() }
}

/// The preset of the built-in model whose file has this stem.
pub(crate) fn preset(stem: &str) -> Option<ModelToml> {
    BUILTIN_MODELS.iter().find(|m| m.file.strip_suffix(".onnx") == Some(stem)).map(|m| (m.preset)())
}

/// Every built-in name.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN_MODELS.iter().map(|m| m.name).collect()
}

/// Finds a model by path or built-in name. Names (and bare file names) are looked up in
/// `$KAFRAY_MODELS`, `assets/models` and `../shared/assets/models`, relative to the working
/// directory and to the executable.
pub fn find_model(name: &str) -> Result<PathBuf> {
    let path = Path::new(name);
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let file = BUILTIN_MODELS
        .iter()
        .find(|m| m.name == name)
        .map(|m| m.file)
        .or_else(|| (path.components().count() == 1).then_some(name))
        .ok_or_else(|| Error::model(path, "no such file"))?;
    let dirs = model_dirs();
    dirs.iter().map(|d| d.join(file)).find(|p| p.is_file()).ok_or_else(|| {
        Error::model(
            path,
            format!(
                "not a file, and {file} is in none of {dirs:?}; give a path to an .onnx file, \
                 one of the names {:?}, or set KAFRAY_MODELS to the folder holding it",
                builtin_names()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_a_preset_and_the_config_names_them_all() {
        for m in BUILTIN_MODELS {
            let stem = m.file.strip_suffix(".onnx").unwrap();
            assert!(preset(stem).is_some(), "{}", m.name);
        }
        assert!(preset("my_model").is_none());
        let model = crate::config::WorkerConfig::docs().into_iter().find(|d| d.name == "model").unwrap();
        for name in builtin_names() {
            assert!(model.help.contains(&format!("`{name}`")), "the model flag's help omits {name}");
        }
    }

    #[test]
    fn a_name_that_is_no_model_says_which_names_there_are() {
        let err = find_model("resnet_9000").unwrap_err().to_string();
        assert!(err.contains("\"mnist\"") && err.contains("KAFRAY_MODELS"), "{err}");
    }
}
