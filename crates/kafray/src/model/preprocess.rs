//! Decoded pixels -> the model's input tensor (one image's slice of it).
use super::spec::{Color, Layout, ModelSpec, Resize};
use crate::frame::{reject, FrameHeaders, Pixels, Rejection, Shape};
use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::DynamicImage;
use std::borrow::Cow;
use std::cell::RefCell;

/// Decodes a frame and writes it into `out`: the one way from a frame's bytes to the model's
/// input, for the worker and for every tool that measures or shows it. A large JPEG is decoded
/// at the smallest scale the model's resize allows ([`ModelSpec::min_decoded_size`]).
pub fn frame_to_tensor(
    spec: &ModelSpec,
    value: &[u8],
    headers: &FrameHeaders,
    out: &mut [f32],
) -> Result<(), Rejection> {
    let pixels = crate::frame::decode_at_least(value, headers, spec.min_decoded_size())?;
    preprocess(spec, &pixels, out)
}

/// Writes one image into `out` (length `spec.input_len()`), in the model's layout and scaling.
pub fn preprocess(spec: &ModelSpec, pixels: &Pixels, out: &mut [f32]) -> Result<(), Rejection> {
    debug_assert_eq!(out.len(), spec.input_len());
    let want = Shape::new(spec.height, spec.width, spec.channels());
    match pixels {
        Pixels::Raw { shape, data } => {
            if *shape != want {
                return Err(reject!("shape {shape} does not match model input {want}"));
            }
            write_tensor(spec, data, out);
        }
        Pixels::Image(img) => {
            if img.width() == 0 || img.height() == 0 {
                return Err(reject!("the image is {}x{}: nothing to classify", img.width(), img.height()));
            }
            let (w, h) = (spec.width as u32, spec.height as u32);
            let img = match spec.resize {
                Resize::Squash => resize(img, w, h, None)?,
                Resize::Crop => resize(img, w, h, Some(centre_crop_box(img, spec)))?,
            };
            let data = match spec.color {
                Color::Gray => img.to_luma8().into_raw(),
                Color::Rgb => img.to_rgb8().into_raw(),
            };
            write_tensor(spec, &data, out);
        }
    }
    Ok(())
}

thread_local! {
    // Its buffers are reused from one image to the next.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// `img` (or the box of it given as left, top, width, height, in its pixels) resized to `w`x`h`
/// with Pillow's bilinear filter, widened when shrinking, as torchvision resizes PIL images.
/// Alpha is ignored, as in Pillow's `convert("RGB")` before resizing.
fn resize(
    img: &DynamicImage,
    w: u32,
    h: u32,
    crop: Option<(f64, f64, f64, f64)>,
) -> Result<Cow<'_, DynamicImage>, Rejection> {
    if crop.is_none() && img.width() == w && img.height() == h {
        return Ok(Cow::Borrowed(img));
    }
    if fast_image_resize::IntoImageView::pixel_type(img).is_none() {
        // A pixel type the resizer lacks: as 8-bit RGB.
        return resize(&DynamicImage::ImageRgb8(img.to_rgb8()), w, h, crop).map(|i| Cow::Owned(i.into_owned()));
    }
    let (src_w, src_h) = (img.width() as f64, img.height() as f64);
    let (left, top, width, height) = crop.unwrap_or((0.0, 0.0, src_w, src_h));
    let options = |l, t, cw, ch| {
        ResizeOptions::new()
            .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
            .use_alpha(false)
            .crop(l, t, cw, ch)
    };
    let failed = |e| reject!("cannot resize the {}x{} image to {w}x{h}: {e}", img.width(), img.height());
    // The width first, then the height, each pass rounded to 8 bits: Pillow's order. The resizer
    // alone would do the height first, which puts up to a fifth of the values a level off Pillow's.
    let mut first_pass = DynamicImage::new(w, img.height(), img.color());
    let mut out = DynamicImage::new(w, h, img.color());
    RESIZER.with_borrow_mut(|r| {
        r.resize(img, &mut first_pass, &options(left, 0.0, width, src_h)).map_err(failed)?;
        r.resize(&first_pass, &mut out, &options(0.0, top, w as f64, height)).map_err(failed)
    })?;
    Ok(Cow::Owned(out))
}

/// torchvision's Resize(resize_to) then CenterCrop(input), as one box of the source: the shorter
/// side scaled to `resize_to` (the longer in proportion, rounded down), the crop's offsets rounded
/// as `center_crop` rounds them (Python's `round`: halves to even, so 58.5 -> 58 for a 640x480
/// photo), then mapped back to source pixels. Resizing that box to the input samples the same
/// points, with the same filter, as resizing the whole image and cropping it.
fn centre_crop_box(img: &DynamicImage, spec: &ModelSpec) -> (f64, f64, f64, f64) {
    let (w, h) = (img.width() as u64, img.height() as u64);
    let short = spec.resize_to as u64;
    let (rw, rh) = if w <= h { (short, short * h / w) } else { (short * w / h, short) };
    let (cw, ch) = (spec.width as f64, spec.height as f64);
    let left = ((rw as f64 - cw) / 2.0).round_ties_even();
    let top = ((rh as f64 - ch) / 2.0).round_ties_even();
    // Each edge is mapped on its own and kept inside the image: `width * (w / rw)` can overshoot
    // `w` by a float step where the crop spans the whole resized side, and the resizer refuses that.
    let edge = |x: f64, side: u64, resized: u64| (x * side as f64 / resized as f64).min(side as f64);
    let (x0, x1) = (edge(left, w, rw), edge(left + cw, w, rw));
    let (y0, y1) = (edge(top, h, rh), edge(top + ch, h, rh));
    (x0, y0, x1 - x0, y1 - y0)
}

/// HWC u8 -> the model's layout, `(x * scale - mean) / std` per channel.
fn write_tensor(spec: &ModelSpec, hwc: &[u8], out: &mut [f32]) {
    let c = spec.channels();
    let plane = spec.height * spec.width;
    let (mul, add): (Vec<f32>, Vec<f32>) =
        (0..c).map(|ch| (spec.scale / spec.std[ch], -spec.mean[ch] / spec.std[ch])).unzip();
    match spec.layout {
        Layout::Nhwc => {
            for (i, (o, &p)) in out.iter_mut().zip(hwc).enumerate() {
                let ch = i % c;
                *o = p as f32 * mul[ch] + add[ch];
            }
        }
        Layout::Nchw => {
            for ch in 0..c {
                let dst = &mut out[ch * plane..(ch + 1) * plane];
                for (o, px) in dst.iter_mut().zip(hwc[ch..].iter().step_by(c)) {
                    *o = *px as f32 * mul[ch] + add[ch];
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::spec::OutputKind;

    fn spec(layout: Layout, color: Color) -> ModelSpec {
        ModelSpec {
            name: "t".into(),
            layout,
            height: 2,
            width: 2,
            color,
            scale: 1.0,
            mean: vec![0.0; color.channels()],
            std: vec![1.0; color.channels()],
            labels: None,
            output: OutputKind::Logits,
            resize: Resize::Squash,
            resize_to: 2,
            jpeg_draft: true,
        }
    }

    #[test]
    fn nchw_splits_channels_into_planes() {
        let s = spec(Layout::Nchw, Color::Rgb);
        let raw: Vec<u8> = (0..12).collect(); // HWC: pixel i has (3i, 3i+1, 3i+2)
        let mut out = vec![0.0; 12];
        preprocess(&s, &Pixels::Raw { shape: Shape::new(2, 2, 3), data: raw }, &mut out).unwrap();
        assert_eq!(out, vec![0., 3., 6., 9., 1., 4., 7., 10., 2., 5., 8., 11.]);
    }

    #[test]
    fn normalises_per_channel() {
        let mut s = spec(Layout::Nhwc, Color::Gray);
        s.scale = 0.5;
        s.mean = vec![1.0];
        s.std = vec![2.0];
        let mut out = vec![0.0; 4];
        preprocess(&s, &Pixels::Raw { shape: Shape::new(2, 2, 1), data: vec![2, 4, 6, 8] }, &mut out).unwrap();
        assert_eq!(out, vec![0.0, 0.5, 1.0, 1.5]);
    }

    #[test]
    fn wrong_raw_shape_is_rejected_with_both_shapes() {
        let s = spec(Layout::Nchw, Color::Gray);
        let err =
            preprocess(&s, &Pixels::Raw { shape: Shape::new(3, 3, 1), data: vec![0; 9] }, &mut [0.0; 4]).unwrap_err();
        assert_eq!(err.0, "shape 3x3x1 does not match model input 2x2x1");
    }

    #[test]
    fn images_are_resized_and_converted() {
        let s = spec(Layout::Nchw, Color::Gray);
        let img = image::DynamicImage::ImageRgb8(image::RgbImage::from_pixel(8, 6, image::Rgb([200, 200, 200])));
        let mut out = vec![0.0; 4];
        preprocess(&s, &Pixels::Image(img), &mut out).unwrap();
        assert!(out.iter().all(|v| (*v - 200.0).abs() < 1.0), "{out:?}");
    }

    /// A crop that spans the whole resized side (resize_to = input) stays inside the image, where
    /// mapping its width back alone overshoots by a float step (7 * (450 / 7) > 450).
    #[test]
    fn a_crop_as_wide_as_the_resized_image_stays_inside_it() {
        let mut s = spec(Layout::Nhwc, Color::Gray);
        (s.width, s.height, s.resize, s.resize_to) = (7, 7, Resize::Crop, 7);
        let img = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(450, 450, image::Luma([90])));
        assert_eq!(centre_crop_box(&img, &s), (0.0, 0.0, 450.0, 450.0));
        let mut out = vec![0.0; 49];
        preprocess(&s, &Pixels::Image(img), &mut out).unwrap();
        assert!(out.iter().all(|v| (*v - 90.0).abs() < 1.0), "{out:?}");
    }

    /// torchvision rounds a half-pixel offset to even: a 640x480 photo resized to 341x256 leaves
    /// 117 columns, and the crop starts at column 58, not 59.
    #[test]
    fn a_half_pixel_crop_offset_rounds_to_even_as_torchvision_does() {
        let mut s = spec(Layout::Nchw, Color::Rgb);
        (s.width, s.height, s.resize, s.resize_to) = (224, 224, Resize::Crop, 256);
        let img = DynamicImage::new_rgb8(640, 480);
        let (left, top, ..) = centre_crop_box(&img, &s);
        assert_eq!(((left * 341.0 / 640.0).round(), top), (58.0, 16.0 * 480.0 / 256.0));
    }

    #[test]
    fn an_empty_image_is_rejected_not_a_panic() {
        let mut s = spec(Layout::Nhwc, Color::Gray);
        s.resize = Resize::Crop;
        let err = preprocess(&s, &Pixels::Image(DynamicImage::new_luma8(0, 5)), &mut [0.0; 4]).unwrap_err();
        assert_eq!(err.0, "the image is 0x5: nothing to classify");
    }

    /// An 8x4 image whose columns are 0, 10, .., 70: with the shorter side kept at 4, the crop
    /// takes the 2x2 centre (columns 3-4, rows 1-2); squash would average every column in.
    #[test]
    fn crop_takes_the_centre_after_scaling_the_shorter_side() {
        let mut s = spec(Layout::Nhwc, Color::Gray);
        s.resize = Resize::Crop;
        s.resize_to = 4;
        let img = image::GrayImage::from_fn(8, 4, |x, _| image::Luma([(x * 10) as u8]));
        let mut out = vec![0.0; 4];
        preprocess(&s, &Pixels::Image(DynamicImage::ImageLuma8(img.clone())), &mut out).unwrap();
        assert_eq!(out, vec![30.0, 40.0, 30.0, 40.0]);
        s.resize = Resize::Squash;
        preprocess(&s, &Pixels::Image(DynamicImage::ImageLuma8(img)), &mut out).unwrap();
        assert!(out[0] < 30.0 && out[1] > 40.0, "squash keeps the whole width: {out:?}");
    }
}
