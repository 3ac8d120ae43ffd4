"""``diffadapt generate`` and the demo app on a video pipeline (a tiny Wan 2.1 saved as a folder,
2 steps, 5 frames, 32 x 32): each video is written as an animated lossless WebP (or a GIF) with
Pillow alone, read back frame by frame and compared with the pipeline called directly
(``output_type="np"``, rounded to uint8 here the way diffusers' ``numpy_to_pil`` rounds); an
image-only output path for a video pipeline, or ``--num_frames`` for an image pipeline, is refused
in one line before the model loads. The app's functions are called directly (no browser)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import diffadapt as da
from diffadapt import cli, media
from tests import tiny_models as tm, tiny_pipelines as tp
from tests.test_cli import run

ROOT = Path(__file__).resolve().parents[1]
STEPS, SIZE, FRAMES, PROMPT = 2, 32, 5, "a red circle"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with tp.one_torch_thread():
        yield


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """The tiny Wan pipeline saved as a folder, and an adapter for its transformer and text encoder."""
    root = tmp_path_factory.mktemp("wan")
    pipe = tp.build_wan(0)
    pipe.save_pretrained(root / "model", safe_serialization=True)
    da.add_adapter(pipe.transformer, da.BOFTConfig(boft_block_size=4), "m", preset="attention+ff")
    da.add_adapter(pipe.text_encoder, da.HRAConfig(r=2), "m", preset="attention")
    tm.randomise(pipe.transformer, "m", 1, scale=0.3)
    tm.randomise(pipe.text_encoder, "m", 2, scale=0.3)
    adapter = da.save_adapter(pipe, root / "motion.safetensors", "m", metadata={"instance_prompt": PROMPT})
    return SimpleNamespace(root=root, model=root / "model", adapter=Path(adapter))


def direct_frames(folder, adapter=None, strength=1.0, seed=0) -> np.ndarray:
    """The reference: the folder loaded as the CLI loads it, called directly, (frames, h, w, 3) uint8."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        da.load_adapter(pipe, adapter, "a")
        da.set_adapters(pipe, ["a"], [strength])
    with torch.no_grad():
        out = pipe(prompt=PROMPT, num_inference_steps=STEPS, guidance_scale=1.0, height=SIZE, width=SIZE,
                   num_frames=FRAMES, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    frames = out.frames[0]
    assert frames.shape == (FRAMES, SIZE, SIZE, 3) and frames.dtype == np.float32
    return (frames * 255).round().astype(np.uint8)


def read_animated(path) -> tuple[np.ndarray, list[int]]:
    """Every frame of an animated file (RGB uint8) and each frame's duration in ms."""
    image = Image.open(path)
    frames, durations = [], []
    for i in range(image.n_frames):
        image.seek(i)
        frames.append(np.asarray(image.convert("RGB")))
        durations.append(image.info.get("duration"))
    return np.stack(frames), durations


def one_line_error(code, err, *words):
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]  # (transformers may log notices first)
    assert len(errors) == 1 and "Traceback" not in err and err.strip().splitlines()[-1] == errors[0], err
    for word in words:
        assert word in errors[0], (word, errors[0])


def generate(capsys, wan, out, *flags):
    return run(capsys, "generate", "--model", wan.model, "--prompt", PROMPT, "--steps", STEPS, "--guidance", 1,
               "--height", SIZE, "--width", SIZE, "--num_frames", FRAMES, *flags, "-o", out)


# -- the command line ------------------------------------------------------------------------------
def test_generate_writes_an_animated_webp_frame_for_frame(wan, capsys, tmp_path):
    base = direct_frames(wan.model)
    with_adapter = direct_frames(wan.model, wan.adapter, 0.8)
    assert not np.array_equal(base, with_adapter), "the adapter must change the frames"
    assert len({f.tobytes() for f in base}) == FRAMES, "distinct frames (an encoder may merge equal ones)"
    for strength, expected in [(0.8, with_adapter), (0, base)]:
        out = tmp_path / f"s{strength}.webp"
        code, stdout, err = generate(capsys, wan, out, "--adapter", f"{wan.adapter}:{strength}")
        assert code == 0, err
        image = Image.open(out)
        assert (image.format, image.n_frames, image.size, image.is_animated) == ("WEBP", FRAMES, (SIZE, SIZE), True)
        frames, durations = read_animated(out)
        np.testing.assert_array_equal(frames, expected, err_msg=f"strength {strength}")
        assert durations == [round(1000 / media.DEFAULT_FPS)] * FRAMES  # Wan has no fps of its own: 16
        assert f"wrote {out} ({FRAMES} frames, {SIZE}x{SIZE}, 16 fps); adapters: motion.safetensors@{strength:g}" in stdout
    # merged into the weights: the same video as live, up to float rounding
    code, _, err = generate(capsys, wan, tmp_path / "merged.webp", "--adapter", f"{wan.adapter}:0.8", "--merge")
    assert code == 0, err
    merged = read_animated(tmp_path / "merged.webp")[0].astype(int)
    assert np.abs(merged - with_adapter.astype(int)).max() <= 1


def test_generate_gif_fps_seed_and_default_output(wan, capsys, tmp_path, monkeypatch):
    code, stdout, err = generate(capsys, wan, tmp_path / "clip.gif", "--fps", 8, "--seed", 3)
    assert code == 0, err
    image = Image.open(tmp_path / "clip.gif")
    assert (image.format, image.n_frames, image.size) == ("GIF", FRAMES, (SIZE, SIZE))
    frames, durations = read_animated(tmp_path / "clip.gif")
    assert durations == [120] * FRAMES  # 125 ms; GIF stores centiseconds
    expected = direct_frames(wan.model, seed=3).astype(int)
    assert np.abs(frames.astype(int) - expected).mean() < 12, "256 colours per frame: close, not exact"
    assert "8 fps" in stdout
    monkeypatch.chdir(tmp_path)  # no --output: diffadapt.webp (an image pipeline's default stays diffadapt.png)
    code, stdout, err = run(capsys, "generate", "--model", wan.model, "--prompt", PROMPT, "--steps", 1,
                            "--height", SIZE, "--width", SIZE, "--num_frames", 1)
    assert code == 0, err
    assert Image.open(tmp_path / "diffadapt.webp").size == (SIZE, SIZE) and "wrote diffadapt.webp (1 frame, " in stdout
    assert cli.build_parser().parse_args(["generate", "--prompt", "x"]).output is None


@pytest.mark.parametrize("output", ["out.png", "out.jpg", "out"])
def test_an_image_only_output_for_a_video_is_refused_before_the_model_loads(wan, capsys, monkeypatch, tmp_path, output):
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a, **k: pytest.fail("refused before the weights load"))
    code, _, err = generate(capsys, wan, tmp_path / output)
    one_line_error(code, err, "diffadapt generate: error: WanPipeline makes videos", output, ".webp or .gif",
                   "--output out.webp")
    assert not (tmp_path / output).exists()


def test_video_flags_for_an_image_pipeline_are_refused(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a, **k: pytest.fail("refused before the weights load"))
    for flag in (["--num_frames", "5"], ["--fps", "8"]):  # the embedded default model: StableDiffusionPipeline
        code, _, err = run(capsys, "generate", "--prompt", "x", *flag)
        one_line_error(code, err, f"{flag[0]}: StableDiffusionPipeline makes images, not videos")
    for flags, words in [(["--num_frames", "0"], ["--num_frames", "'0'"]), (["--fps", "0"], ["--fps", "'0'", "> 0"]),
                         (["--fps", "nan"], ["--fps", "'nan'", "finite"])]:
        code, _, err = run(capsys, "generate", "--prompt", "x", *flags)
        one_line_error(code, err, "diffadapt generate: error: argument", *words)


def test_media_reads_every_form_of_frames():
    rng = np.random.default_rng(0)
    floats = rng.random((2, 3, 8, 16, 3), dtype=np.float32)  # (videos, frames, h, w, c)
    expected = (floats * 255).round().astype(np.uint8)
    as_tensor = torch.from_numpy(floats).permute(0, 1, 4, 2, 3)  # (videos, frames, c, h, w)
    as_pil = [[Image.fromarray(f) for f in v] for v in expected]
    for frames in (floats, as_tensor, as_pil, SimpleNamespace(frames=floats)):
        got = media.videos(frames)
        assert len(got) == 2 and all(len(v) == 3 for v in got)
        np.testing.assert_array_equal(np.stack([np.stack([np.asarray(f) for f in v]) for v in got]), expected)
    from diffusers import StableDiffusionPipeline, WanPipeline

    assert media.is_video(WanPipeline) and media.default_frames(WanPipeline) == 81 and media.fps_of(WanPipeline) == 16
    assert not media.is_video(StableDiffusionPipeline) and media.default_frames(StableDiffusionPipeline) is None
    with pytest.raises(ValueError, match=r"\.webp or \.gif"):
        media.save_animated(as_pil[0], "clip.mp4")


# -- the demo app ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_app():
    pytest.importorskip("gradio")
    sys.path.insert(0, str(ROOT))
    import app

    return app


def test_app_generate_returns_an_animated_result(wan, demo_app):
    app = demo_app.create_app(str(wan.model), [str(wan.adapter)], num_frames=FRAMES)
    assert app.video and app.num_frames == FRAMES and app.names == ["motion"]

    def request(adapters, **extra):
        return demo_app.GenerateRequest(PROMPT, adapters, steps=STEPS, guidance=1.0, width=SIZE, height=SIZE, **extra)

    res = app.generate(request([("motion", 0.0)], side_by_side=True))
    base = direct_frames(wan.model)
    assert len(res.media) == 2 and all(Path(m).suffix == ".webp" for m in res.media)
    for shown, frames in zip(res.media, res.videos):  # with the adapter at 0, and without: the base video
        image = Image.open(shown)
        assert (image.n_frames, image.size) == (FRAMES, (SIZE, SIZE))
        np.testing.assert_array_equal(read_animated(shown)[0], base)
        np.testing.assert_array_equal(np.stack([np.asarray(f) for f in frames]), base)
    np.testing.assert_array_equal(np.asarray(res.images[0]), base[0])  # images: the first frames
    assert f"video: {FRAMES} frames at 16 fps" in res.summary() and "(both videos)" in res.summary()
    assert res.as_dict()["video"] == {"frames": FRAMES, "fps": 16.0}
    live = app.generate(request([("motion", 0.8)]))
    np.testing.assert_array_equal(read_animated(live.media[0])[0], direct_frames(wan.model, wan.adapter, 0.8))
    one = app.generate(request([("motion", 0.8)], num_frames=1))  # a request may ask for another frame count
    assert Image.open(one.media[0]).n_frames == 1 and "video: 1 frame at 16 fps" in one.summary()
    for bad, words in [(0, "Frames must be a whole number"), (2.5, "Frames must be a whole number")]:
        with pytest.raises(ValueError, match=words):
            app.generate(request([], num_frames=bad))

    # the page's handler (called as gradio calls it): the gallery gets the animated file, shown as an image
    demo = demo_app.build_ui(app)
    (on_generate,) = [f.fn for f in demo.fns.values() if f.api_name == "generate"]
    n = app.max_adapters
    values = [PROMPT, "", 0, False, STEPS, 1.0, SIZE, SIZE, "live", False, True, *[False] * (n - 1), 0.0, *[1.0] * (n - 1)]
    gallery, info, details = on_generate(SimpleNamespace(session_hash="video-visitor"), lambda *a, **k: None, *values)
    ((path, caption),) = gallery
    assert caption == "with motion @ 0" and Image.open(path).n_frames == FRAMES and details["video"]["frames"] == FRAMES
    (shown,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "result"]
    item = shown.postprocess(gallery).root[0]
    assert type(item).__name__ == "GalleryImage" and item.image.mime_type == "image/webp" and item.image.path == path
    (note,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "grid_note"]
    assert "first frame" in note.value

    # the strength grid: each cell is its video's first frame, and the summary says so
    grid = app.grid(request([("motion", 1.0)]), "0, 0.8")
    assert grid.cell_size == (SIZE, SIZE) and "first frame" in grid.summary()
    np.testing.assert_array_equal(np.asarray(grid.cells[0][0]), base[0])
    np.testing.assert_array_equal(np.asarray(grid.cells[0][1]),
                                  np.asarray(app.generate(request([("motion", 0.8)])).images[0]))


def test_app_num_frames_for_an_image_pipeline_is_refused(demo_app):
    with pytest.raises(ValueError, match="--num-frames: StableDiffusionPipeline makes images, not videos"):
        demo_app.DemoApp(tp.build_sd(0), num_frames=5)
    app = demo_app.DemoApp(tp.build_sd(0))
    assert not app.video
    with pytest.raises(ValueError, match="Frames: StableDiffusionPipeline makes images"):
        app.generate(demo_app.GenerateRequest("x", steps=1, width=32, height=32, num_frames=5))


def test_to_uint8_rounds_as_diffusers_numpy_to_pil():
    """float32 pixels whose float32 ``x * 255`` is exactly ``k + 0.5`` (round half to even gives the
    upper level) but whose float64 product lies just below: diffusers' PIL output and ours must agree."""
    from diffusers.image_processor import VaeImageProcessor

    values = np.array([0.6098039150238037, 0.8686274290084839, 0.7666666507720947, 0.0, 1.0, 0.5], dtype=np.float32)
    image = np.broadcast_to(values[None, :, None], (1, 6, 3)).copy()[None]  # (1, h, w, 3) float32
    theirs = np.asarray(VaeImageProcessor.numpy_to_pil(image)[0])
    ours = media.to_uint8(image)[0]
    assert theirs[0, :3, 0].tolist() == [156, 222, 196]  # float32 rounding (float64 gives 155, 221, 195)
    np.testing.assert_array_equal(ours, theirs)
