//! Decoded pixels -> the model's input tensor (one image's slice of it).
use super::spec::{Color, Layout, ModelSpec, Resize};
use crate::frame::{reject, Pixels, Rejection, Shape};
use image::imageops::FilterType;
use image::DynamicImage;
use std::borrow::Cow;

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
            let img = match spec.resize {
                Resize::Squash => squash(img, spec.width as u32, spec.height as u32),
                Resize::Crop => centre_crop(img, spec),
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

fn squash(img: &DynamicImage, w: u32, h: u32) -> Cow<'_, DynamicImage> {
    if img.width() == w && img.height() == h {
        Cow::Borrowed(img)
    } else {
        Cow::Owned(img.resize_exact(w, h, FilterType::Triangle))
    }
}

/// The shorter side to `resize_to` (the longer in proportion, rounded down as torchvision does),
/// then the input size from the centre (offsets rounded as torchvision's `center_crop`).
fn centre_crop<'a>(img: &'a DynamicImage, spec: &ModelSpec) -> Cow<'a, DynamicImage> {
    let (w, h) = (img.width() as u64, img.height() as u64);
    let short = spec.resize_to as u64;
    let (rw, rh) = if w <= h { (short, short * h / w) } else { (short * w / h, short) };
    let resized = squash(img, rw as u32, rh as u32);
    let (cw, ch) = (spec.width as u32, spec.height as u32);
    let left = ((rw as f64 - cw as f64) / 2.0).round() as u32;
    let top = ((rh as f64 - ch as f64) / 2.0).round() as u32;
    Cow::Owned(resized.crop_imm(left, top, cw, ch))
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
