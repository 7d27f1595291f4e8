//! The MNIST IDX format (gzip or not): images as 28x28 u8 pixels, labels as u8.
use kafray::error::{Error, Result};
use std::io::Read;
use std::path::Path;

#[derive(Debug)]
pub struct Digits {
    pub rows: usize,
    pub cols: usize,
    pub pixels: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Digits {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.rows * self.cols;
        &self.pixels[i * n..(i + 1) * n]
    }
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    gunzip_if_gz(raw, &path.display().to_string())
}

fn gunzip_if_gz(raw: Vec<u8>, name: &str) -> Result<Vec<u8>> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| Error::io(format!("gunzip {name}"), e))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(b: &[u8], at: usize) -> usize {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

/// Reads an IDX3 image file and its IDX1 label file.
pub fn load(images: &Path, labels: &Path) -> Result<Digits> {
    let (img, lab) = (read_maybe_gz(images)?, read_maybe_gz(labels)?);
    parse(img, lab, &images.display().to_string(), &labels.display().to_string())
}

/// An IDX3 image file and its IDX1 label file already in memory (gzip or not); the names are
/// for the errors.
pub fn parse(images: Vec<u8>, labels: Vec<u8>, images_name: &str, labels_name: &str) -> Result<Digits> {
    let bad = |p: &str, why: &str| Error::Config(format!("{p} is not an MNIST IDX file: {why}"));
    let img = gunzip_if_gz(images, images_name)?;
    if img.len() < 16 || be_u32(&img, 0) != 0x0803 {
        return Err(bad(images_name, "expected magic 0x00000803 (idx3-ubyte)"));
    }
    let (n, rows, cols) = (be_u32(&img, 4), be_u32(&img, 8), be_u32(&img, 12));
    if img.len() != 16 + n * rows * cols {
        return Err(bad(images_name, "size does not match its header"));
    }
    let lab = gunzip_if_gz(labels, labels_name)?;
    if lab.len() < 8 || be_u32(&lab, 0) != 0x0801 {
        return Err(bad(labels_name, "expected magic 0x00000801 (idx1-ubyte)"));
    }
    if be_u32(&lab, 4) != n || lab.len() != 8 + n {
        return Err(bad(labels_name, &format!("expected {n} labels, as many as images")));
    }
    let mut pixels = img;
    pixels.drain(..16);
    Ok(Digits { rows, cols, pixels, labels: lab[8..].to_vec() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_plain_and_rejects_wrong_magic() {
        let dir = tempfile::tempdir().unwrap();
        let (ip, lp) = (dir.path().join("i"), dir.path().join("l"));
        let mut img = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2];
        img.extend([1, 2, 3, 4]);
        std::fs::write(&ip, &img).unwrap();
        std::fs::write(&lp, [0, 0, 8, 1, 0, 0, 0, 2, 7, 9]).unwrap();
        let d = load(&ip, &lp).unwrap();
        assert_eq!((d.len(), d.rows, d.cols), (2, 1, 2));
        assert_eq!((d.image(1), d.labels[1]), (&[3u8, 4][..], 9));
        assert!(load(&lp, &lp).unwrap_err().to_string().contains("idx3"));
    }
}
