//! Where things are in a kafray checkout: the ONNX Runtime library of the project's `.venv`
//! (models by name are the engine's: [`kafray::model::find_model`]).
use std::path::{Path, PathBuf};

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
