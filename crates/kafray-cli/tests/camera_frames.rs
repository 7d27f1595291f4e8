//! Camera-size JPEG frames decoded at the scale the model needs (DCT-domain downscaling): the
//! classes stay those of a full decode, and the tensors' difference from it is reported.
mod common;

use common::*;
use kafray::frame::{self, FrameHeaders, Pixels};
use kafray::model::{find_model, Model};
use kafray_tools::publish::{to_jpeg, FrameSize};

/// The shared photos as 1280x720 and 1920x1080 camera frames, through MobileNetV2 with and
/// without `jpeg_draft`: the top-1 class must be the same; the tensors' difference is printed
/// (`cargo test --release --test camera_frames -- --nocapture`), not asserted, since a scaled
/// decode is not the full one.
#[test]
fn scaled_decoding_keeps_the_full_decodes_class_on_camera_frames() {
    kafray_tools::layout::use_venv_runtime();
    let mut model = Model::load(find_model("mobilenet_v2").unwrap(), 1, 1).unwrap();
    assert!(model.spec.jpeg_draft, "the preset scales large JPEGs");
    let full_spec = kafray::model::ModelSpec { jpeg_draft: false, ..model.spec.clone() };
    let len = model.input_len();
    let (mut scaled, mut full) = (vec![0f32; len], vec![0f32; len]);
    let headers = FrameHeaders::default();
    let mut report = vec!["photo size decoded-at top-1 max|diff| mean|diff|".to_string()];
    let mut photos: Vec<_> =
        std::fs::read_dir(shared_assets().join("images")).unwrap().map(|e| e.unwrap().path()).collect();
    photos.sort();
    assert!(photos.len() >= 4, "{photos:?}");
    for photo in &photos {
        let bytes = std::fs::read(photo).unwrap();
        for size in [FrameSize { width: 1280, height: 720 }, FrameSize { width: 1920, height: 1080 }] {
            let jpeg = to_jpeg(&bytes, size, 90).unwrap();
            let Pixels::Image(decoded) =
                frame::decode_at_least(&jpeg, &headers, model.spec.min_decoded_size()).unwrap()
            else {
                panic!("a JPEG decodes to an image")
            };
            // The shorter side scaled to at least the 256 the crop needs, and no further.
            let short = decoded.width().min(decoded.height());
            assert!(
                (256..512).contains(&short),
                "{photo:?} at {size}: decoded at {}x{}",
                decoded.width(),
                decoded.height()
            );
            model.frame_to_tensor(&jpeg, &headers, &mut scaled).unwrap();
            kafray::model::preprocess::frame_to_tensor(&full_spec, &jpeg, &headers, &mut full).unwrap();
            let top = |m: &mut Model, t: &[f32]| m.classify(t).unwrap()[0].class();
            let (class_scaled, class_full) = (top(&mut model, &scaled), top(&mut model, &full));
            let diffs: Vec<f32> = scaled.iter().zip(&full).map(|(a, b)| (a - b).abs()).collect();
            let max = diffs.iter().cloned().fold(0.0, f32::max);
            let mean = diffs.iter().sum::<f32>() / diffs.len() as f32;
            report.push(format!(
                "{} {size} {}x{} {} {max:.3} {mean:.4}",
                photo.file_stem().unwrap().to_string_lossy(),
                decoded.width(),
                decoded.height(),
                model.label(class_scaled).unwrap_or("?"),
            ));
            assert_eq!(
                class_scaled,
                class_full,
                "{photo:?} at {size}: {} scaled, {} in full",
                model.label(class_scaled).unwrap_or("?"),
                model.label(class_full).unwrap_or("?")
            );
        }
    }
    println!("{}", report.join("\n"));
}

/// A 1080p frame into a 28x28 model is decoded at 1/8; a PNG, a small JPEG and a CMYK JPEG
/// (which libjpeg-turbo cannot turn into RGB) are decoded in full, as before.
#[test]
fn only_large_jpegs_are_decoded_smaller() {
    let photo = std::fs::read(shared_assets().join("images/chelsea.png")).unwrap();
    let headers = FrameHeaders::default();
    let min = Some(frame::MinSize::Each { width: 28, height: 28 });
    let size = |bytes: &[u8]| match frame::decode_at_least(bytes, &headers, min).unwrap() {
        Pixels::Image(img) => (img.width(), img.height()),
        raw => panic!("{raw:?}"),
    };
    let big = to_jpeg(&photo, FrameSize { width: 1920, height: 1080 }, 90).unwrap();
    assert_eq!(size(&big), (240, 135));
    assert_eq!(size(&to_jpeg(&photo, FrameSize::square(40), 90).unwrap()), (40, 40), "not twice 28: in full");
    assert_eq!(size(&photo), (451, 300), "a PNG: in full");
    // A frame cut short gets the full decode's verdict: libjpeg-turbo's complaint sends it there.
    let cut = &big[..big.len() / 2];
    let (scaled, full) = (frame::decode_at_least(cut, &headers, min), frame::decode(cut, &headers));
    assert_eq!(scaled.is_ok(), full.is_ok(), "scaled {scaled:?}, full {full:?}");
    if let (Ok(Pixels::Image(scaled)), Ok(Pixels::Image(full))) = (&scaled, &full) {
        assert_eq!(scaled.width(), full.width(), "decoded in full, as before");
    }
    let none = frame::decode_at_least(&big, &headers, None).unwrap();
    assert!(matches!(none, Pixels::Image(ref img) if img.width() == 1920), "without a size: in full");
    // Made with Pillow: chelsea.png at 224x224, .convert("CMYK").save("cmyk.jpg", quality=90).
    let cmyk = std::fs::read(repo_root().join("crates/kafray-cli/tests/frames/cmyk.jpg")).unwrap();
    assert_eq!(size(&cmyk), (224, 224), "a CMYK JPEG: in full, by the image crate");
}
