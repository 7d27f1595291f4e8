//! The frame: one image as it travels on the input topic, and its decoding.
//! See the README's "Message formats": this is a public contract.
use image::{DynamicImage, ImageFormat};
use std::fmt;

pub const HEADER_FORMAT: &str = "kafray.format";
pub const HEADER_SHAPE: &str = "kafray.shape";
pub const HEADER_SEQ: &str = "kafray.seq";
pub const HEADER_LABEL: &str = "kafray.label";
pub const HEADER_TRUTH: &str = "kafray.truth";
pub const HEADER_ERROR: &str = "kafray.error";

/// How the frame's value is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    Png,
    Jpeg,
    /// u8 pixels, row-major, HWC; needs a shape.
    Raw,
}

impl PixelFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            PixelFormat::Png => "png",
            PixelFormat::Jpeg => "jpeg",
            PixelFormat::Raw => "raw",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "png" => Some(PixelFormat::Png),
            "jpeg" | "jpg" => Some(PixelFormat::Jpeg),
            "raw" => Some(PixelFormat::Raw),
            _ => None,
        }
    }

    /// Detects PNG or JPEG from the magic bytes.
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(&[0x89, b'P', b'N', b'G']) {
            Some(PixelFormat::Png)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(PixelFormat::Jpeg)
        } else {
            None
        }
    }
}

/// Height x width x channels of a raw frame, written `HxWxC`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub height: usize,
    pub width: usize,
    pub channels: usize,
}

impl Shape {
    pub fn new(height: usize, width: usize, channels: usize) -> Self {
        Shape { height, width, channels }
    }

    pub fn parse(s: &str) -> Option<Self> {
        let dims: Vec<usize> = s.trim().split('x').map(|d| d.parse().ok()).collect::<Option<_>>()?;
        match dims[..] {
            [h, w, c] if h > 0 && w > 0 && (c == 1 || c == 3) => Some(Shape::new(h, w, c)),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.height * self.width * self.channels
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}x{}", self.height, self.width, self.channels)
    }
}

/// A decoded frame: either an image or raw pixels that already match a model input.
#[derive(Debug)]
pub enum Pixels {
    Image(DynamicImage),
    Raw { shape: Shape, data: Vec<u8> },
}

/// Why a frame was rejected; the text goes into the dead-letter header `kafray.error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection(pub String);

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! reject {
    ($($arg:tt)*) => { Rejection(format!($($arg)*)) };
}
pub(crate) use reject;

/// The headers kafray reads from a frame, all optional.
#[derive(Debug, Default, Clone)]
pub struct FrameHeaders {
    pub format: Option<String>,
    pub shape: Option<String>,
    pub seq: Option<u64>,
    pub label: Option<String>,
}

/// Decodes a frame value according to its headers (or its magic bytes).
pub fn decode(value: &[u8], headers: &FrameHeaders) -> Result<Pixels, Rejection> {
    if value.is_empty() {
        return Err(reject!("empty frame"));
    }
    let format = match headers.format.as_deref() {
        Some(f) => {
            PixelFormat::parse(f).ok_or_else(|| reject!("unknown {HEADER_FORMAT} {f:?} (expected png, jpeg or raw)"))?
        }
        None => PixelFormat::sniff(value)
            .ok_or_else(|| reject!("undecodable image: not PNG or JPEG, and no {HEADER_FORMAT}: raw header"))?,
    };
    match format {
        PixelFormat::Raw => {
            let text =
                headers.shape.as_deref().ok_or_else(|| reject!("raw frame without {HEADER_SHAPE} header (HxWxC)"))?;
            let shape = Shape::parse(text)
                .ok_or_else(|| reject!("bad {HEADER_SHAPE} {text:?}: expected HxWxC with C = 1 or 3"))?;
            if value.len() != shape.len() {
                return Err(reject!("raw frame has {} bytes but shape {shape} needs {}", value.len(), shape.len()));
            }
            Ok(Pixels::Raw { shape, data: value.to_vec() })
        }
        PixelFormat::Png | PixelFormat::Jpeg => {
            let fmt = if format == PixelFormat::Png { ImageFormat::Png } else { ImageFormat::Jpeg };
            image::load_from_memory_with_format(value, fmt)
                .map(Pixels::Image)
                .map_err(|e| reject!("undecodable image ({}): {e}", format.as_str()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes() -> Vec<u8> {
        let img = image::GrayImage::from_pixel(4, 3, image::Luma([7]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn sniffs_png_and_decodes_it() {
        let bytes = png_bytes();
        assert_eq!(PixelFormat::sniff(&bytes), Some(PixelFormat::Png));
        match decode(&bytes, &FrameHeaders::default()).unwrap() {
            Pixels::Image(img) => assert_eq!((img.width(), img.height()), (4, 3)),
            other => panic!("expected an image, got {other:?}"),
        }
    }

    #[test]
    fn rejects_truncated_png_with_reason() {
        let bytes = png_bytes();
        let err = decode(&bytes[..bytes.len() / 2], &FrameHeaders::default()).unwrap_err();
        assert!(err.0.starts_with("undecodable image (png)"), "{err}");
    }

    #[test]
    fn rejects_empty_and_random_bytes() {
        assert_eq!(decode(&[], &FrameHeaders::default()).unwrap_err().0, "empty frame");
        let err = decode(b"\x01\x02hello", &FrameHeaders::default()).unwrap_err();
        assert!(err.0.contains("not PNG or JPEG"), "{err}");
    }

    #[test]
    fn raw_frames_need_a_matching_shape() {
        let headers = FrameHeaders { format: Some("raw".into()), shape: Some("2x2x1".into()), ..Default::default() };
        assert!(matches!(decode(&[1, 2, 3, 4], &headers), Ok(Pixels::Raw { .. })));
        let err = decode(&[1, 2, 3], &headers).unwrap_err();
        assert_eq!(err.0, "raw frame has 3 bytes but shape 2x2x1 needs 4");
        let bad = FrameHeaders { shape: Some("2x2".into()), ..headers };
        assert!(decode(&[1, 2, 3, 4], &bad).unwrap_err().0.contains("bad kafray.shape"));
    }

    #[test]
    fn shape_round_trips() {
        let s = Shape::parse("28x28x1").unwrap();
        assert_eq!(s.to_string(), "28x28x1");
        assert_eq!(s.len(), 784);
        assert!(Shape::parse("28x28x2").is_none());
        assert!(Shape::parse("0x28x1").is_none());
    }
}
