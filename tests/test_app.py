"""The Gradio demo (app.py) on the embedded default pipeline, served in-process.

* browser (headless Debian chromium driven by Playwright): generate, switch adapters and
  strength, live/merged, side by side; the page shows what was used; a bad upload is refused in
  the page; a screenshot is saved (path printed; copied to $DIFFADAPT_TEST_ARTIFACTS if set);
* concurrency: 10 simultaneous gradio_client requests (and 8 direct threads) with different
  adapters/strengths/modes each get exactly the image that choice gives when rendered alone;
* uploads: not safetensors, another architecture, wrong shapes, truncated, too large: refused
  with a message, the pipeline unchanged, the app keeps serving; a good upload becomes usable.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from PIL import Image  # noqa: E402

import app as demo_app  # noqa: E402  (app.py at the repository root)
import diffadapt as da  # noqa: E402
from tests import tiny_pipelines as tp  # noqa: E402

STEPS, SIZE, GUIDANCE = 2, 32, 1.0  # guidance 1: no CFG batch, half the work on 2 busy cores
PROMPT = "a photo of sks hexagon"
CHROMIUM = "/usr/bin/chromium"


def randomise(module, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in da.adapter_parameters(module, name).items():
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.mul_(1 + noise) if key.endswith("boft_s") else p.add_(noise)


def model_adapter(model, component, config, path, seed=0):
    """A one-component pipeline adapter file for a bare model (no whole pipeline needed)."""
    da.add_adapter(model, config, "x")
    randomise(model, "x", seed)
    return da.save_adapter(SimpleNamespace(components={component: model}), path, "x")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    from diffusers import StableDiffusionPipeline

    from diffadapt.defaults import default_model_path

    model_path = default_model_path()  # the embedded default, loaded like any local folder
    pipe = StableDiffusionPipeline.from_pretrained(model_path)
    adapters = root / "adapters"
    da.add_adapter(pipe.unet, da.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2), "boft", preset="attention+ff")
    randomise(pipe.unet, "boft", 1)
    da.save_adapter(pipe, adapters / "boft_subject", "boft", metadata={"instance_prompt": PROMPT})  # a folder
    da.add_adapter(pipe.unet, da.HRAConfig(r=4), "hra")
    randomise(pipe.unet, "hra", 2)
    da.save_adapter(pipe, adapters / "hra_style.safetensors", "hra", metadata={"instance_prompt": "in zwx style"})
    da.add_adapter(pipe.unet, da.FourierFTConfig(n_frequency=64, scaling=300.0), "fft")
    randomise(pipe.unet, "fft", 3)
    good = da.save_adapter(pipe, root / "uploads" / "fourier_late.safetensors", "fft", metadata={"instance_prompt": "qwe"})
    bad = root / "bad"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an adapter")
    sd3 = model_adapter(tp.tiny_sd3_transformer(), "transformer", da.HRAConfig(r=2), bad / "sd3_transformer.safetensors")
    sdxl = model_adapter(tp.tiny_sdxl_unet(), "unet", da.HRAConfig(r=2), bad / "sdxl_unet.safetensors")  # same class, other shapes
    data = (adapters / "hra_style.safetensors").read_bytes()
    (bad / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    return SimpleNamespace(root=root, model=model_path, adapters=adapters, good=good, sd3=sd3, sdxl=sdxl,
                           txt=bad / "notes.txt", truncated=bad / "truncated.safetensors")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(files):
    from diffusers import DiffusionPipeline

    loads = []
    original = DiffusionPipeline.__dict__["from_pretrained"]

    def counting(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs)
        return original.__func__(cls, *args, **kwargs)

    DiffusionPipeline.from_pretrained = classmethod(counting)
    try:
        app = demo_app.create_app(str(files.model), [str(files.adapters)], max_upload_mb=1)
        demo = demo_app.build_ui(app)
        port = free_port()
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, max_file_size="1mb")
        yield SimpleNamespace(app=app, url=f"http://127.0.0.1:{port}/", loads=loads)
    finally:
        DiffusionPipeline.from_pretrained = original
        if "demo" in locals():
            demo.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server.url, verbose=False)


def pixels(image) -> np.ndarray:
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    return np.asarray(image.convert("RGB"))


def request(adapters=(), mode="live", seed=0, side=False):
    return demo_app.GenerateRequest(PROMPT, list(adapters), seed=seed, steps=STEPS, guidance=GUIDANCE,
                                    width=SIZE, height=SIZE, mode=mode, side_by_side=side)


def api_args(app, adapters=(), mode="live", seed=0, side=False):
    """Positional inputs of the /generate endpoint: the controls, then a checkbox and a strength
    per adapter slot (slot i = i-th loaded adapter)."""
    use, strength = [False] * app.max_adapters, [1.0] * app.max_adapters
    for name, s in adapters:
        use[app.names.index(name)], strength[app.names.index(name)] = True, s
    return [PROMPT, "", seed, False, STEPS, GUIDANCE, SIZE, SIZE, mode, side, *use, *strength]


def in_slot_order(app, adapters):
    return sorted(adapters, key=lambda pair: app.names.index(pair[0]))


# -- 1. the page in a real browser ------------------------------------------------------------------
def test_browser_generate_switch_and_screenshot(server, files, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium; .ci/run does it)")
    app = server.app
    assert app.names == ["boft_subject", "hra_style"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server.url)
            expect = sync_api.expect
            expect(page.locator("#adapters_table")).to_contain_text(PROMPT)  # metadata: trigger prompt
            expect(page.locator("#adapters_table")).to_contain_text("boft")
            page.locator("#prompt textarea").fill(PROMPT)

            def number(elem, value):
                box = page.locator(f"#{elem} input[type=number]")
                box.fill(str(value))
                box.press("Enter")

            for elem, value in [("steps", STEPS), ("width", SIZE), ("height", SIZE)]:
                number(elem, value)

            def generate(expected_text, n_images=1):
                page.locator("#generate").click()
                expect(page.locator("#info")).to_contain_text(expected_text, timeout=90_000)
                imgs = page.locator("#result img")
                expect(imgs).to_have_count(n_images, timeout=30_000)
                srcs = imgs.evaluate_all("els => els.map(e => e.src)")
                return [pixels(_fetch(page, src)) for src in srcs]

            (base,) = generate("none (base model)")
            assert base.shape == (SIZE, SIZE, 3)

            page.locator("#use_0 input[type=checkbox]").check()
            number("strength_0", 0.7)
            (boft,) = generate("boft_subject @ 0.7")
            assert not np.array_equal(boft, base), "the adapter must change the image"

            number("strength_0", 0.3)
            (weaker,) = generate("boft_subject @ 0.3")
            assert not np.array_equal(weaker, boft), "the strength must change the image"

            page.locator("#use_0 input[type=checkbox]").uncheck()
            page.locator("#use_1 input[type=checkbox]").check()
            page.locator("#mode label", has_text="merged").click()
            page.locator("#side input[type=checkbox]").check()
            hra, side_base = generate("hra_style @ 1 · mode merged", n_images=2)
            assert not np.array_equal(hra, base) and not np.array_equal(hra, boft)
            np.testing.assert_array_equal(side_base, base)  # same seed, no adapters: the base image
            expect(page.locator("#result")).to_contain_text("without adapters")
            expect(page.locator("#info")).to_contain_text("switch")
            expect(page.locator("#info")).to_contain_text("generation")

            # a file for another architecture: refused in the page, nothing changes
            page.locator("#upload input[type=file]").set_input_files(str(files.sd3))
            expect(page.locator("#upload_status")).to_contain_text("Upload refused", timeout=60_000)
            expect(page.locator("#upload_status")).to_contain_text("sd3_transformer.safetensors has adapters for 'transformer'")
            expect(page.locator("#upload_status")).not_to_contain_text("/tmp/")  # no server paths in messages
            assert app.names == ["boft_subject", "hra_style"]

            shot = tmp_path / "app_screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    target = os.environ.get("DIFFADAPT_TEST_ARTIFACTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shot = Path(shutil.copy(shot, Path(target) / shot.name))
    print(f"\nscreenshot of the demo page: {shot}")
    assert len(server.loads) == 1, "switching adapters must never reload the base model"


def _fetch(page, src):
    import io

    response = page.request.get(src)
    assert response.ok, src
    return Image.open(io.BytesIO(response.body()))


# -- 2. several users at once ---------------------------------------------------------------------
CHOICES = [
    ((), "live"),
    ((("boft_subject", 1.0),), "live"),
    ((("boft_subject", 0.4),), "live"),
    ((("hra_style", 1.0),), "live"),
    ((("hra_style", 0.6),), "merged"),
    ((("boft_subject", 1.0), ("hra_style", 0.5)), "live"),
    ((("boft_subject", 1.0), ("hra_style", 0.5)), "merged"),
    ((("boft_subject", 0.8),), "merged"),
    ((("boft_subject", 0.2), ("hra_style", 1.5)), "live"),
    ((), "merged"),
]


def test_concurrent_requests_get_exactly_their_adapters(server, client):
    app = server.app
    choices = [(in_slot_order(app, adapters), mode) for adapters, mode in CHOICES]
    t0 = time.perf_counter()
    jobs = [client.submit(*api_args(app, adapters, mode), api_name="/generate") for adapters, mode in choices]
    results = [job.result(timeout=300) for job in jobs]
    concurrent_s = time.perf_counter() - t0
    alone = [pixels(app.generate(request(adapters, mode)).images[0]) for adapters, mode in choices]
    for (adapters, mode), (gallery, info, details), reference in zip(choices, results, alone):
        assert details["adapters"] == [[n, s] for n, s in adapters] and details["mode"] == mode
        assert details["seed"] == 0 and details["switch_ms"] >= 0 and details["generation_s"] > 0
        assert "Adapters used" in info
        assert len(gallery) == 1
        np.testing.assert_array_equal(pixels(gallery[0]["image"]), reference, err_msg=f"{adapters} {mode}")
    # the live choices all give different images, so a mix-up could not go unnoticed
    distinct = {alone[i].tobytes() for i, (_, mode) in enumerate(choices) if mode == "live"}
    assert len(distinct) == sum(mode == "live" for _, mode in choices)
    print(f"\n{len(jobs)} concurrent API requests: {concurrent_s:.1f} s")


def test_direct_generate_is_serialised_by_the_lock(server):
    """The lock, not only gradio's queue: 8 threads call DemoApp.generate at the same moment."""
    app = server.app
    choices = [(in_slot_order(app, a), m) for a, m in CHOICES[:8]]
    barrier = threading.Barrier(len(choices))

    def run(choice):
        barrier.wait()
        return pixels(app.generate(request(*choice)).images[0])

    with ThreadPoolExecutor(len(choices)) as pool:
        together = list(pool.map(run, choices))
    for choice, image in zip(choices, together):
        np.testing.assert_array_equal(image, pixels(app.generate(request(*choice)).images[0]), err_msg=str(choice))


# -- 3. uploads -------------------------------------------------------------------------------------
def test_bad_uploads_are_refused_and_the_app_keeps_serving(server, client, files):
    from gradio_client import handle_file

    app = server.app
    before = list(app.names)
    loaded_before = da.list_adapters(app.pipe)
    expected = {
        files.txt: "Invalid file type",  # gradio's own check (file_types) before app.py sees it
        files.sd3: "transformer",  # another architecture
        files.sdxl: "does not fit",  # a UNet, but other shapes
        files.truncated: "not a readable adapter",
    }
    for path, words in expected.items():
        try:
            status = client.predict(handle_file(str(path)), api_name="/upload_adapter")[0]
        except Exception as exc:  # gradio_client raises AppError for a gr.Error
            status = str(exc)
        assert words in status, (path.name, status)
        assert app.names == before and da.list_adapters(app.pipe) == loaded_before
    # the same checks straight on DemoApp: every refusal is an AdapterError with a message
    for path in [files.txt, files.sd3, files.sdxl, files.truncated]:
        with pytest.raises(demo_app.AdapterError):
            app.add_upload(path)
    big = files.root / "big.safetensors"
    big.write_bytes(b"\0" * (2 * 2**20))
    with pytest.raises(demo_app.AdapterError, match="upload limit"):
        app.add_upload(big)
    assert app.names == before
    # and it still serves
    gallery, info, details = client.predict(*api_args(app, [("hra_style", 1.0)]), api_name="/generate")
    np.testing.assert_array_equal(pixels(gallery[0]["image"]), pixels(app.generate(request([("hra_style", 1.0)])).images[0]))


def test_a_good_upload_becomes_a_usable_adapter(server, client, files):
    from gradio_client import handle_file

    app = server.app
    status = client.predict(handle_file(str(files.good)), api_name="/upload_adapter")[0]
    assert "Loaded **fourier_late**" in status
    assert app.names[-1] == "fourier_late" and app.adapters[-1].method == "fourierft"
    assert app.adapters[-1].trigger == "qwe" and app.adapters[-1].parameters > 0
    assert "fourier_late" in app.table()
    choice = [("fourier_late", 0.9)]
    gallery, info, details = client.predict(*api_args(app, choice, "merged"), api_name="/generate")
    assert "fourier_late @ 0.9" in info
    image = pixels(gallery[0]["image"])
    np.testing.assert_array_equal(image, pixels(app.generate(request(choice, "merged")).images[0]))
    assert not np.array_equal(image, pixels(app.generate(request()).images[0]))
    assert len(server.loads) == 1


def test_find_adapters_and_request_checks(files, server):
    found = demo_app.find_adapters([str(files.adapters)])
    assert [p.name for p in found] == ["boft_subject", "hra_style.safetensors"]
    assert demo_app.find_adapters([str(files.good)]) == [files.good]
    with pytest.raises(demo_app.AdapterError):
        demo_app.find_adapters([str(files.root / "nowhere")])
    app = server.app
    for bad in [request([("nope", 1.0)]), request(mode="baked"), demo_app.GenerateRequest("", width=SIZE, height=SIZE),
                request([("hra_style", 1.0), ("hra_style", 0.5)]), demo_app.GenerateRequest(PROMPT, width=33, height=32)]:
        with pytest.raises(ValueError):
            app.generate(bad)
    calls = []
    result = app.generate(request([("hra_style", 0.5)], seed=None, side=True), progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 2 * STEPS) for i in range(1, 2 * STEPS + 1)]  # the progress bar's feed
    assert 0 <= result.seed <= demo_app.MAX_SEED and len(result.images) == 2
    assert result.captions == ["with hra_style @ 0.5", "without adapters"]
