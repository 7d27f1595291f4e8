//! Classifying files instead of a stream: the paper's batch study. A file is an MNIST IDX
//! shard (many digits, with the labels file beside it when there is one) or one PNG/JPEG image.
use crate::mnist::{self, Digits};
use kafray::error::{Error, Result};
use kafray::frame::{self, FrameHeaders, Pixels, Shape};
use kafray::model::Model;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What one file held and what the model made of it.
#[derive(Debug, Clone, PartialEq)]
pub struct FileResult {
    /// Predicted class per image, in file order.
    pub classes: Vec<usize>,
    /// Ground truth per image, when the file comes with labels.
    pub labels: Option<Vec<u8>>,
    /// Seconds reading and parsing the file (the paper's "read").
    pub read_s: f64,
    /// Seconds preprocessing and classifying its images (the paper's "evaluate").
    pub evaluate_s: f64,
}

impl FileResult {
    pub fn correct(&self) -> Option<usize> {
        let labels = self.labels.as_ref()?;
        Some(self.classes.iter().zip(labels).filter(|(c, l)| **c == usize::from(**l)).count())
    }
}

/// Classifies every image of `path`, `batch_size` images per inference call.
pub fn classify_file(model: &mut Model, path: &Path, batch_size: usize) -> Result<FileResult> {
    let started = Instant::now();
    let bytes = std::fs::read(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let (images, labels) = if frame::PixelFormat::sniff(&bytes).is_some() {
        let pixels = frame::decode_at_least(&bytes, &FrameHeaders::default(), model.spec.min_decoded_size())
            .map_err(|r| Error::Config(format!("{}: {r}", path.display())))?;
        (vec![pixels], None)
    } else {
        let labels_path = shard_labels(path)?;
        let labels =
            std::fs::read(&labels_path).map_err(|e| Error::io(format!("read {}", labels_path.display()), e))?;
        let digits = mnist::parse(bytes, labels, &path.display().to_string(), &labels_path.display().to_string())?;
        (digit_pixels(&digits), Some(digits.labels))
    };
    classify_images(model, &path.display().to_string(), images, labels, batch_size, started)
}

/// [`classify_file`] for a shard already in memory (shipped rather than read from a shared folder).
pub fn classify_shard_bytes(
    model: &mut Model,
    name: &str,
    images: Vec<u8>,
    labels: Vec<u8>,
    batch_size: usize,
) -> Result<FileResult> {
    let started = Instant::now();
    let digits = mnist::parse(images, labels, name, &format!("the labels of {name}"))?;
    let images = digit_pixels(&digits);
    classify_images(model, name, images, Some(digits.labels), batch_size, started)
}

fn digit_pixels(digits: &Digits) -> Vec<Pixels> {
    let shape = Shape::new(digits.rows, digits.cols, 1);
    (0..digits.len()).map(|i| Pixels::Raw { shape, data: digits.image(i).to_vec() }).collect()
}

/// Preprocesses and classifies; `read_s` is the time from `started` (reading and parsing) to here.
fn classify_images(
    model: &mut Model,
    name: &str,
    images: Vec<Pixels>,
    labels: Option<Vec<u8>>,
    batch_size: usize,
    started: Instant,
) -> Result<FileResult> {
    let read_s = started.elapsed().as_secs_f64();
    let evaluating = Instant::now();
    let per_image = model.input_len();
    let mut classes = Vec::with_capacity(images.len());
    let mut input = vec![0f32; per_image * batch_size.max(1)];
    for chunk in images.chunks(batch_size.max(1)) {
        for (pixels, slot) in chunk.iter().zip(input.chunks_mut(per_image)) {
            model.preprocess(pixels, slot).map_err(|r| Error::Config(format!("{name}: {r}")))?;
        }
        let out = model.classify(&input[..chunk.len() * per_image])?;
        classes.extend(out.iter().map(|c| c.class()));
    }
    Ok(FileResult { classes, labels, read_s, evaluate_s: evaluating.elapsed().as_secs_f64() })
}

/// The labels file of an IDX image shard, or why it is not a shard.
pub fn shard_labels(images: &Path) -> Result<PathBuf> {
    labels_path_for(images).filter(|p| p.is_file()).ok_or_else(|| {
        Error::Config(format!(
            "{}: not a PNG or JPEG image, and no labels file beside it (an MNIST shard `NAME-images-idx3-ubyte[.gz]` \
             needs `NAME-labels-idx1-ubyte[.gz]`)",
            images.display()
        ))
    })
}

/// `x-images-idx3-ubyte[.gz]` -> `x-labels-idx1-ubyte[.gz]`, MNIST's own naming.
pub fn labels_path_for(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    name.contains("images-idx3").then(|| images.with_file_name(name.replace("images-idx3", "labels-idx1")))
}

/// Splits `digits` into `files` shards of `per_file` digits each (wrapping around the set when it
/// is shorter), written as `digits-NNNNN-images-idx3-ubyte` plus labels into `dir`.
pub fn write_mnist_shards(digits: &Digits, dir: &Path, files: usize, per_file: usize) -> Result<Vec<PathBuf>> {
    if digits.is_empty() || per_file == 0 {
        return Err(Error::Config("shards need at least one digit each, from a non-empty set".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let pixels_per = digits.rows * digits.cols;
    let mut paths = Vec::with_capacity(files);
    for f in 0..files {
        let picks: Vec<usize> = (0..per_file).map(|j| (f * per_file + j) % digits.len()).collect();
        let mut img = Vec::with_capacity(16 + picks.len() * pixels_per);
        for v in [0x0803, picks.len(), digits.rows, digits.cols] {
            img.extend((v as u32).to_be_bytes());
        }
        let mut lab = Vec::with_capacity(8 + picks.len());
        for v in [0x0801, picks.len()] {
            lab.extend((v as u32).to_be_bytes());
        }
        for &i in &picks {
            img.extend_from_slice(digits.image(i));
            lab.push(digits.labels[i]);
        }
        let images = dir.join(format!("digits-{f:05}-images-idx3-ubyte"));
        let labels = labels_path_for(&images).expect("the name has images-idx3");
        for (path, bytes) in [(&images, &img), (&labels, &lab)] {
            std::fs::write(path, bytes).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
        }
        paths.push(images);
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_round_trip_through_the_idx_reader_and_wrap_around() {
        let digits = Digits { rows: 1, cols: 2, pixels: vec![1, 2, 3, 4, 5, 6], labels: vec![7, 8, 9] };
        let dir = tempfile::tempdir().unwrap();
        let paths = write_mnist_shards(&digits, dir.path(), 2, 2).unwrap();
        assert_eq!(paths.len(), 2);
        let second = mnist::load(&paths[1], &shard_labels(&paths[1]).unwrap()).unwrap();
        assert_eq!(second.labels, vec![9, 7], "the second shard takes digit 2, then wraps to digit 0");
        assert_eq!((second.image(0), second.image(1)), (&[5u8, 6][..], &[1u8, 2][..]));
    }

    #[test]
    fn a_file_that_is_neither_image_nor_shard_names_the_expected_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, "hello").unwrap();
        let err = shard_labels(&path).unwrap_err().to_string();
        assert!(err.contains("labels-idx1-ubyte"), "{err}");
    }
}
