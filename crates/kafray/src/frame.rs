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

/// The largest image side kafray decodes (16K: beyond any camera frame). A frame that declares
/// more is rejected before anything is allocated for it: its header alone could ask for tens of
/// gigabytes.
pub const MAX_SIDE: u32 = 16_384;
/// The most memory one image's decoding may allocate.
const MAX_DECODE_BYTES: u64 = 1 << 30;

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
        let side = 1..=MAX_SIDE as usize;
        match dims[..] {
            [h, w, c] if side.contains(&h) && side.contains(&w) && (c == 1 || c == 3) => Some(Shape::new(h, w, c)),
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
            let mut limits = image::Limits::default();
            limits.max_image_width = Some(MAX_SIDE);
            limits.max_image_height = Some(MAX_SIDE);
            limits.max_alloc = Some(MAX_DECODE_BYTES);
            let mut reader = image::ImageReader::with_format(std::io::Cursor::new(value), fmt);
            reader.limits(limits);
            reader.decode().map(Pixels::Image).map_err(|e| reject!("undecodable image ({}): {e}", format.as_str()))
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

    /// A PNG that is only a header declaring `width` x `height` RGB.
    fn png_header(width: u32, height: u32) -> Vec<u8> {
        let mut ihdr = b"IHDR".to_vec();
        ihdr.extend(width.to_be_bytes());
        ihdr.extend(height.to_be_bytes());
        ihdr.extend([8, 2, 0, 0, 0]);
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        out.extend(13u32.to_be_bytes());
        out.extend(&ihdr);
        out.extend(crc32(&ihdr).to_be_bytes());
        out
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
            }
        }
        !crc
    }

    /// A JPEG whose frame header (SOF0) declares `side` x `side`, and nothing after it.
    fn jpeg_header(side: u16) -> Vec<u8> {
        let mut out = vec![0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x11, 0x08];
        out.extend(side.to_be_bytes());
        out.extend(side.to_be_bytes());
        out.extend([3, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11, 1]);
        out.extend([0xFF, 0xD9]);
        out
    }

    #[test]
    fn images_declaring_absurd_sizes_are_rejected_without_allocating_them() {
        let err = decode(&png_header(60_000, 60_000), &FrameHeaders::default()).unwrap_err();
        assert!(err.0.starts_with("undecodable image (png)") && err.0.contains("limit"), "{err}");
        let err = decode(&jpeg_header(65_000), &FrameHeaders::default()).unwrap_err();
        assert!(err.0.starts_with("undecodable image (jpeg)"), "{err}");
        let raw = FrameHeaders { format: Some("raw".into()), ..Default::default() };
        for absurd in ["18446744073709551615x2x3", "100000x100000x3", "0x5x1"] {
            let headers = FrameHeaders { shape: Some(absurd.into()), ..raw.clone() };
            assert!(decode(&[0; 12], &headers).unwrap_err().0.contains("bad kafray.shape"), "{absurd}");
        }
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
