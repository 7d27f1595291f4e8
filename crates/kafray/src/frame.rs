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

/// The least size a decoded image must keep for the model: a JPEG at least twice that is decoded
/// at 1/2, 1/4 or 1/8 of its size, the smallest of these that keeps it (libjpeg-turbo scales in
/// the DCT domain, so it skips most of the decoding and the resize has less to shrink).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MinSize {
    /// Both sides at least this (a model that squashes the image to its input).
    Each { width: u32, height: u32 },
    /// The shorter side at least this (a model that scales the shorter side, then crops).
    ShortSide(u32),
}

impl MinSize {
    /// The largest of 8, 4 and 2 that `width`x`height` can be divided by and keep this size (each
    /// side rounded up, as libjpeg scales), or 1.
    pub fn jpeg_denominator(self, width: u32, height: u32) -> u32 {
        let scaled = |side: u32, d: u32| side.div_ceil(d);
        [8, 4, 2]
            .into_iter()
            .find(|&d| match self {
                MinSize::Each { width: w, height: h } => scaled(width, d) >= w && scaled(height, d) >= h,
                MinSize::ShortSide(short) => scaled(width, d).min(scaled(height, d)) >= short,
            })
            .unwrap_or(1)
    }
}

/// Decodes a frame value according to its headers (or its magic bytes), at full size.
pub fn decode(value: &[u8], headers: &FrameHeaders) -> Result<Pixels, Rejection> {
    decode_at_least(value, headers, None)
}

/// [`decode`], but a JPEG large enough is decoded smaller, keeping `min` (see [`MinSize`]).
/// Only JPEGs are scaled: PNG and raw frames are decoded as they are.
pub fn decode_at_least(value: &[u8], headers: &FrameHeaders, min: Option<MinSize>) -> Result<Pixels, Rejection> {
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
            if let Some(img) = min.filter(|_| format == PixelFormat::Jpeg).and_then(|min| scaled_jpeg(value, min)) {
                return Ok(Pixels::Image(img));
            }
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

thread_local! {
    // Its buffers and libjpeg-turbo's state are reused from one frame to the next.
    static JPEG: std::cell::RefCell<Option<turbojpeg::Decompressor>> = const { std::cell::RefCell::new(None) };
}

/// A JPEG decoded at the scale `min` allows, where that is below full size; `None` where it is
/// not, and where libjpeg-turbo cannot decode it (a CMYK JPEG, a corrupt one): the full decode
/// then takes it, and rejects it with its own reason if it must.
fn scaled_jpeg(value: &[u8], min: MinSize) -> Option<DynamicImage> {
    JPEG.with_borrow_mut(|slot| {
        let jpeg = match slot {
            Some(d) => d,
            None => slot.insert(turbojpeg::Decompressor::new().ok()?),
        };
        let header = jpeg.read_header(value).ok()?;
        let (width, height) = (u32::try_from(header.width).ok()?, u32::try_from(header.height).ok()?);
        if width > MAX_SIDE || height > MAX_SIDE {
            return None;
        }
        let denominator = min.jpeg_denominator(width, height);
        if denominator == 1 {
            return None;
        }
        // TurboJPEG decodes at the largest scale whose size fits the output's: asking for the
        // sides divided by `denominator` (rounded up, as it rounds) gets exactly 1/denominator.
        let (w, h) = (width.div_ceil(denominator), height.div_ceil(denominator));
        let gray = header.colorspace == turbojpeg::Colorspace::Gray;
        let format = if gray { turbojpeg::PixelFormat::GRAY } else { turbojpeg::PixelFormat::RGB };
        let channels = format.size();
        let mut pixels = vec![0u8; w as usize * h as usize * channels];
        let image = turbojpeg::Image {
            pixels: &mut pixels[..],
            width: w as usize,
            pitch: w as usize * channels,
            height: h as usize,
            format,
        };
        jpeg.decompress(value, image).ok()?;
        if gray {
            image::GrayImage::from_raw(w, h, pixels).map(DynamicImage::ImageLuma8)
        } else {
            image::RgbImage::from_raw(w, h, pixels).map(DynamicImage::ImageRgb8)
        }
    })
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
    fn a_jpeg_is_scaled_by_the_largest_denominator_that_keeps_the_size() {
        let crop = MinSize::ShortSide(256);
        assert_eq!(crop.jpeg_denominator(1920, 1080), 4, "270 >= 256; 1/8 gives 135");
        assert_eq!(crop.jpeg_denominator(1280, 720), 2, "360; 1/4 gives 180");
        assert_eq!(crop.jpeg_denominator(640, 480), 1, "1/2 gives 240 < 256");
        assert_eq!(crop.jpeg_denominator(512, 2048), 2, "the shorter side, whichever it is");
        assert_eq!(crop.jpeg_denominator(2041, 2041), 8, "rounded up as libjpeg rounds: 2041/8 -> 256");
        assert_eq!(crop.jpeg_denominator(2040, 2040), 4, "2040/8 = 255");
        assert_eq!(crop.jpeg_denominator(2048, 2048), 8);
        let squash = MinSize::Each { width: 224, height: 224 };
        assert_eq!(squash.jpeg_denominator(1920, 1080), 4, "both sides: 1080/8 = 135 < 224");
        assert_eq!(squash.jpeg_denominator(300, 3000), 1, "the narrow side allows none");
        assert_eq!(MinSize::Each { width: 28, height: 28 }.jpeg_denominator(1920, 1080), 8);
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
