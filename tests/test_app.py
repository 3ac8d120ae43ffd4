"""The Gradio demo (app.py) on the embedded default pipeline, served in-process.

* browser (headless Debian chromium driven by Playwright): generate, switch adapters and
  strength, live/merged, side by side; the page shows what was used; a bad upload is refused in
  the page; a screenshot is saved (path printed; copied to $DIFFADAPT_TEST_ARTIFACTS if set);
* concurrency: 10 simultaneous gradio_client requests (and 8 direct threads) with different
  adapters/strengths/modes each get exactly the image that choice gives when rendered alone;
* uploads: not safetensors, another architecture, wrong shapes, truncated, too large: refused
  with a message, the pipeline unchanged, the app keeps serving; a good upload becomes usable;
  a LyCORIS/kohya/ComfyUI file is accepted like diffadapt and PEFT files;
* sessions: an upload belongs to the session (browser tab / gradio_client) that made it: no other
  session sees or uses it, each page has its own slots (the page says how many are left), and the
  uploads go when the session ends (tab closed, client closed) or idles past the time limit;
* hostile files: names, metadata and errors are escaped (no remote <img>, no broken code span);
  nan / inf strengths, guidance, steps are refused naming the value;
* ready to use: steps / guidance / example prompts read from the model folder's card, the shared
  adapters open checked with their trigger prompts in the prompt box (checking or uploading one
  prefills an untouched prompt, never the visitor's own text);
* the strength grid (adapters x strengths, one seed): each cell is pixel for pixel the single
  generation of that adapter at that strength, strength 0 is the base image; over the cell limit
  it is refused in one line; in the browser one click makes it.
"""

from __future__ import annotations

import functools
import html
import os
import random
import re
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
from tests import tiny_models as tm, tiny_pipelines as tp  # noqa: E402

STEPS, SIZE, GUIDANCE = 2, 32, 1.0  # guidance 1: no CFG batch, half the work on 2 busy cores
PROMPT = "a photo of sks hexagon"
CHROMIUM = "/usr/bin/chromium"


randomise = functools.partial(tm.randomise, scale=0.3)


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
    # a LyCORIS/kohya/ComfyUI file (output-side OFT as oft_blocks), and the same adapter as a diffadapt file
    da.add_adapter(pipe.unet, da.OFTConfig(oft_block_size=4, rotation_side="output"), "oft", preset="attention")
    randomise(pipe.unet, "oft", 4)
    lycoris = root / "uploads" / "comfy_oft.safetensors"
    da.save_lycoris(pipe, lycoris, "oft")
    oft = da.save_adapter(pipe, root / "uploads" / "oft_same.safetensors", "oft")
    da.add_adapter(pipe.unet, da.HRAConfig(r=2), "evil")
    evil = da.save_adapter(pipe, root / "uploads" / "hostile.safetensors", "evil", metadata=HOSTILE)
    return SimpleNamespace(root=root, model=model_path, adapters=adapters, good=good, sd3=sd3, sdxl=sdxl,
                           txt=bad / "notes.txt", truncated=bad / "truncated.safetensors", lycoris=lycoris, oft=oft,
                           evil=evil)


EVIL_URL = "http://127.0.0.1:9/evil.png"
HOSTILE = {  # metadata a visitor can put in a file: every value ends up in the page
    "instance_prompt": f"`sks` <img src={EVIL_URL}> **bold** | pipe ` tick $$x^2$$ [link](http://evil.test) www.evil.test",
    "base_model": f'<img src="{EVIL_URL}" onerror="alert(1)"><script>alert(2)</script>',
    "method": "<b>hra</b>_x_ & &amp; \\`",
}


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
        yield SimpleNamespace(app=app, demo=demo, url=f"http://127.0.0.1:{port}/", loads=loads)
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


def api_args(app, adapters=(), mode="live", seed=0, side=False, session=None):
    """Positional inputs of the /generate endpoint: the controls, then a checkbox and a strength
    per adapter slot (slot i = i-th adapter the session sees: the shared ones, then its uploads)."""
    use, strength = [False] * app.max_adapters, [1.0] * app.max_adapters
    names = app.names_for(session)
    for name, s in adapters:
        use[names.index(name)], strength[names.index(name)] = True, s
    return [PROMPT, "", seed, False, STEPS, GUIDANCE, SIZE, SIZE, mode, side, *use, *strength]


def in_slot_order(app, adapters, session=None):
    return sorted(adapters, key=lambda pair: app.names_for(session).index(pair[0]))


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
            # it opens ready to use: the model card's steps, the shared adapters checked, their triggers as the
            # prompt; unchecking one takes its trigger out of the untouched prompt; an example prompt is one click
            expect(page.locator("#steps input[type=number]")).to_have_value(str(app.default_steps))
            expect(page.locator("#use_0 input[type=checkbox]")).to_be_checked()
            expect(page.locator("#use_1 input[type=checkbox]")).to_be_checked()
            prompt = page.locator("#prompt textarea")
            expect(prompt).to_have_value(f"{PROMPT}, in zwx style")
            page.locator("#use_1 input[type=checkbox]").uncheck()
            expect(prompt).to_have_value(PROMPT, timeout=30_000)
            page.locator("#use_0 input[type=checkbox]").uncheck()
            expect(prompt).to_have_value(app.examples[0], timeout=30_000)
            page.locator("#examples").get_by_text(app.examples[1], exact=True).click()
            expect(prompt).to_have_value(app.examples[1], timeout=30_000)
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


def test_browser_strength_grid(server):
    """One click: the checked adapters (rows) x the strengths (columns), one seed, labelled."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium; .ci/run does it)")
    app = server.app
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(server.url)
            expect = sync_api.expect
            expect(page.locator("#use_1 input[type=checkbox]")).to_be_checked()  # both shared adapters: the rows
            page.locator("#prompt textarea").fill(PROMPT)
            for elem, value in [("steps", STEPS), ("guidance", GUIDANCE), ("width", SIZE), ("height", SIZE)]:
                box = page.locator(f"#{elem} input[type=number]")
                box.fill(str(value))
                box.press("Enter")
            page.locator("#grid_strengths textarea").fill("0, 0.5, 1")
            page.locator("#make_grid").click()
            expect(page.locator("#info")).to_contain_text("2 adapter(s) x 3 strength(s)", timeout=120_000)
            imgs = page.locator("#result img")
            expect(imgs).to_have_count(1, timeout=30_000)
            (src,) = imgs.evaluate_all("els => els.map(e => e.src)")
            shown = pixels(_fetch(page, src))
        finally:
            browser.close()
    direct = app.grid(request([("boft_subject", 1.0), ("hra_style", 1.0)]), [0, 0.5, 1])
    x, y = direct.origin
    assert shown.shape == (y + 2 * SIZE, x + 3 * SIZE, 3), "2 rows x 3 columns of cells, plus the labels"
    np.testing.assert_array_equal(shown, pixels(direct.image))
    base = pixels(app.generate(request()).images[0])
    for r in range(2):
        x0, y0, x1, y1 = direct.cell_box(r, 0)
        np.testing.assert_array_equal(shown[y0:y1, x0:x1], base, err_msg="strength 0 is the base image for the seed")
        x0, y0, x1, y1 = direct.cell_box(r, 2)
        assert not np.array_equal(shown[y0:y1, x0:x1], base), "strength 1 changes the image"


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
    """Usable by the session that uploaded it, and by no other."""
    from gradio_client import handle_file

    app = server.app
    mine = client.session_hash
    status, table, slots = client.predict(handle_file(str(files.good)), api_name="/upload_adapter")[:3]
    assert "Loaded **fourier_late**" in status
    assert app.names == ["boft_subject", "hra_style"], "an upload is not shared"
    assert app.names_for(mine)[-1] == "fourier_late" and app.view(mine)[-1].method == "fourierft"
    assert app.view(mine)[-1].trigger == "qwe" and app.view(mine)[-1].parameters > 0
    assert "fourier_late" in app.table(mine) and "fourier_late" in table and "fourier_late" not in app.table()
    assert "5 of 6 upload slots left" in slots
    choice = [("fourier_late", 0.9)]
    gallery, info, details = client.predict(*api_args(app, choice, "merged", session=mine), api_name="/generate")
    assert "fourier_late @ 0.9" in info
    image = pixels(gallery[0]["image"])
    np.testing.assert_array_equal(image, pixels(app.generate(request(choice, "merged"), session=mine).images[0]))
    assert not np.array_equal(image, pixels(app.generate(request()).images[0]))
    # another visitor: does not see it, cannot ask for it, and its slot 2 is empty
    other = gradio_client.Client(server.url, verbose=False)
    try:
        assert app.names_for(other.session_hash) == ["boft_subject", "hra_style"]
        with pytest.raises(ValueError, match="Unknown adapter"):
            app.generate(request(choice), session=other.session_hash)
        args = api_args(app, session=mine)
        args[10 + 2] = True  # the checkbox of slot 2: fourier_late in the uploader's page
        with pytest.raises(Exception, match="no longer loaded"):
            other.predict(*args, api_name="/generate")
        gallery, info, details = other.predict(*api_args(app, [("hra_style", 1.0)]), api_name="/generate")
        assert details["adapters"] == [["hra_style", 1.0]]
    finally:
        other.close()
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
    for field, value, words in [("adapters", [("hra_style", float("nan"))], "'hra_style' must be a finite number (got nan)"),
                                ("adapters", [("boft_subject", float("inf"))], "'boft_subject' must be a finite number (got inf)"),
                                ("adapters", [("hra_style", "-inf")], "(got '-inf')"),
                                ("guidance", float("nan"), "Guidance must be a finite number"),
                                ("steps", 0, "Steps must be"), ("steps", float("inf"), "Steps must be"),
                                ("seed", -1, "Seed must be"), ("width", float("nan"), "Width and height")]:
        req = request()
        setattr(req, field, value)
        with pytest.raises(ValueError, match=re.escape(words)):
            app.generate(req)
    calls = []
    result = app.generate(request([("hra_style", 0.5)], seed=None, side=True), progress=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 2 * STEPS) for i in range(1, 2 * STEPS + 1)]  # the progress bar's feed
    assert 0 <= result.seed <= demo_app.MAX_SEED and len(result.images) == 2
    assert result.captions == ["with hra_style @ 0.5", "without adapters"]


# -- 4. uploads belong to their session ---------------------------------------------------------------
def test_each_session_has_its_own_slots_freed_when_it_ends(server, files):
    app = server.app
    base = pixels(app.generate(request([("hra_style", 1.0)])).images[0])
    before = da.list_adapters(app.pipe)
    room = app.max_adapters - len(app.adapters)
    assert app.slots_left("greedy") == room and f"{room} of {room} upload slots left" in app.slots_text("greedy")
    for i in range(room):  # one visitor fills every slot of its page...
        a = app.add_upload(files.good, session="greedy")
        assert a.name == ("fourier_late" if i == 0 else f"fourier_late_{i + 1}") and a.owner == "greedy"
    assert app.slots_left("greedy") == 0 and f"0 of {room} upload slots left" in app.slots_text("greedy")
    with pytest.raises(demo_app.AdapterError, match="adapter slots of this page are in use"):
        app.add_upload(files.good, session="greedy")
    # ...and the next visitor still has all of its own; same file name, its own adapter
    assert app.slots_left("next") == room
    mine = app.add_upload(files.good, session="next")
    assert mine.name == "fourier_late" and mine.key != app.view("greedy")[len(app.adapters)].key
    assert app.names_for("next") == [*app.names, "fourier_late"] and len(app.view("greedy")) == app.max_adapters
    # a refused upload changes nothing, for anyone
    views = {s: [a.key for a in app.view(s)] for s in ("greedy", "next")}
    loaded = da.list_adapters(app.pipe)
    for bad in (files.sdxl, files.truncated, files.sd3):
        with pytest.raises(demo_app.AdapterError):
            app.add_upload(bad, session="next")
    assert {s: [a.key for a in app.view(s)] for s in views} == views and da.list_adapters(app.pipe) == loaded
    # the same choice gives the same image in both sessions (each uses its own copy)
    choice = [("fourier_late", 0.7)]
    np.testing.assert_array_equal(pixels(app.generate(request(choice), session="greedy").images[0]),
                                  pixels(app.generate(request(choice), session="next").images[0]))
    # a session that ends frees its slots and its adapters
    assert app.end_session("greedy") == room
    assert app.view("greedy") == app.adapters and app.slots_left("greedy") == room
    assert not any(a.startswith("upload") and a.endswith(tuple(f"fourier_late_{i}" for i in range(2, room + 1)))
                   for a in da.list_adapters(app.pipe))
    # an idle one expires
    app.touch("next")
    assert app.expire() == 0 and "next" in app.sessions
    app.sessions["next"].last_seen -= app.session_ttl_s + 1  # as if idle past the limit (others are not)
    assert app.expire() == 1 and "next" not in app.sessions
    assert da.list_adapters(app.pipe).keys() == before.keys()
    np.testing.assert_array_equal(pixels(app.generate(request([("hra_style", 1.0)])).images[0]), base)
    # the bound over all sessions together (memory)
    limit = app.max_uploads
    try:
        app.max_uploads = app.uploads_held() + 1  # (other tests' sessions hold some)
        app.add_upload(files.good, session="first")
        with pytest.raises(demo_app.AdapterError, match=f"limit of {app.max_uploads} uploaded adapters"):
            app.add_upload(files.good, session="second")
        assert app.slots_left("second") == 0 and "No upload slot free right now" in app.slots_text("second")
    finally:
        app.max_uploads = limit
        app.end_session("first")
    assert da.list_adapters(app.pipe).keys() == before.keys()


def test_a_lycoris_upload_is_accepted_like_any_other(server, client, files):
    from gradio_client import handle_file

    app = server.app
    status = client.predict(handle_file(str(files.lycoris)), api_name="/upload_adapter")[0]
    assert "Loaded **comfy_oft**" in status and "(oft," in status
    session = client.session_hash
    theirs = app.view(session)[-1]
    assert theirs.name == "comfy_oft" and theirs.metadata["source_format"] == "lycoris"
    ours = app.add_upload(files.oft, session=session)  # the same adapter, as a diffadapt file
    assert ours.parameters == theirs.parameters
    for mode in ("live", "merged"):
        a = pixels(app.generate(request([("comfy_oft", 0.8)], mode), session=session).images[0])
        b = pixels(app.generate(request([("oft_same", 0.8)], mode), session=session).images[0])
        np.testing.assert_array_equal(a, b)
    gallery, info, details = client.predict(*api_args(app, [("comfy_oft", 0.8)], session=session), api_name="/generate")
    np.testing.assert_array_equal(pixels(gallery[0]["image"]), a)
    assert not np.array_equal(a, pixels(app.generate(request()).images[0]))


def test_closing_a_client_ends_its_session(server, files, monkeypatch):
    from gradio_client import handle_file

    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.2")  # read by the server per heartbeat connection
    app = server.app
    visitor = gradio_client.Client(server.url, verbose=False)
    session = visitor.session_hash
    try:
        assert "Loaded" in visitor.predict(handle_file(str(files.good)), api_name="/upload_adapter")[0]
        key = app.view(session)[-1].key
        assert key in da.list_adapters(app.pipe)
    finally:
        visitor.close()
    deadline = time.monotonic() + 30
    while session in app.sessions and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session not in app.sessions, "the session's uploads must go when it ends"
    assert key not in da.list_adapters(app.pipe)


# -- 5. hostile files ---------------------------------------------------------------------------------
def _rendered(markdown_text):
    """The HTML a CommonMark + GFM-table renderer makes of the app's Markdown (the page uses marked)."""
    markdown_it = pytest.importorskip("markdown_it")
    return markdown_it.MarkdownIt("commonmark").enable("table").render(markdown_text)


def test_hostile_metadata_is_shown_as_text(server, client, files):
    from gradio_client import handle_file

    app = server.app
    status, table, slots = client.predict(handle_file(str(files.evil)), api_name="/upload_adapter")[:3]
    assert "Loaded **hostile**" in status
    session = client.session_hash
    assert table == app.table(session)
    page = _rendered(table)
    tags = set(re.findall(r"<\s*([a-zA-Z]+)", page))
    assert tags <= {"table", "thead", "tbody", "tr", "th", "td", "em"}, tags  # em: the "nothing loaded" line only
    for raw in (table, status):
        assert "<" not in raw and ">" not in raw and "`" not in raw and "http:" not in raw and "www." not in raw
        assert "$$" not in raw
    assert "|" not in status and all(line.count("|") == 8 for line in table.splitlines())  # the table's own pipes only
    text = html.unescape(re.sub(r"<[^>]+>", "", page))
    for value in HOSTILE.values():
        assert " ".join(value.split()) in text, value  # shown, character for character
    rows = [r for r in page.split("<tr>") if "hostile" in r]
    assert len(rows) == 1 and rows[0].count("<td") == 7, "a | in a value must not add table cells"
    # a refusal naming a hostile file is escaped too: the page's status line and the toast
    named = files.root / "uploads" / "<img src=x onerror=alert(1)> `x`.safetensors"
    named.write_bytes(files.truncated.read_bytes())
    status = client.predict(handle_file(str(named)), api_name="/upload_adapter")[0]  # gradio strips <>`
    assert "Upload refused" in status and "<" not in status and "`" not in status
    (upload,) = [f.fn for f in server.demo.fns.values() if f.api_name == "upload_adapter"]
    with pytest.warns(UserWarning) as toasts:  # gr.Warning outside a request: a Python warning
        status = upload(SimpleNamespace(session_hash="hostile-name"), str(named))[0]  # the name as is
    assert "Upload refused" in status and "not a readable adapter" in status
    assert "<" not in status and "`" not in status and "&#60;img src&#61;x onerror&#61;alert&#40;1&#41;&#62;" in status
    toast = " ".join(str(w.message) for w in toasts)
    assert "<img" not in toast and "&lt;img src=x onerror=alert(1)&gt;" in toast
    assert "hostile-name" not in app.sessions


def test_regex_bomb_and_gigabyte_uploads_are_refused_in_seconds(server, files, tmp_path):
    """Issue 14, items 1 and 2 in the app: a 90 KB upload whose overrides key backtracks for ever
    on the UNet's module names, one with such a modules_to_save entry, and one asking for
    r=3,000,000 (~10 GB of slots) are each refused in seconds, naming the field or the shapes,
    without the process growing, with the lock free again and the app serving. A hang would hold
    the GIL (no thread could time it out): faulthandler's watchdog then ends the run loudly."""
    import faulthandler
    import json
    import resource

    from safetensors import safe_open
    from safetensors.torch import save_file

    def hostile(source, name, change):
        with safe_open(str(source), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(meta["diffadapt"])
        change(header["components"]["unet"]["config"])
        path = tmp_path / name
        save_file(tensors, str(path), metadata={**meta, "diffadapt": json.dumps(header)})
        return path

    hra = files.adapters / "hra_style.safetensors"
    cases = {
        hostile(files.good, "bomb90k.safetensors", lambda c: c.__setitem__(
            "overrides", {r"(\w+\.?)+" + "z" * 90_000: {"n_frequency": 8}})): ["overrides key pattern", "at most 1000"],
        hostile(files.good, "bomb.safetensors", lambda c: c.__setitem__("modules_to_save", [r"(\w+\.?)+z"])):
            ["modules_to_save pattern", "nested quantifier"],
        hostile(hra, "huge.safetensors", lambda c: c.__setitem__("r", 3_000_000)): ["does not fit", "vs layer (", "3000000)"],
    }
    assert all(p.stat().st_size < 200_000 for p in cases)
    app = server.app
    (upload,) = [f.fn for f in server.demo.fns.values() if f.api_name == "upload_adapter"]
    loaded = da.list_adapters(app.pipe)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    faulthandler.dump_traceback_later(120, exit=True)
    try:
        for path, words in cases.items():
            t = time.perf_counter()
            with pytest.warns(UserWarning) as toasts:
                status = upload(SimpleNamespace(session_hash="bomber"), str(path))[0]
            assert time.perf_counter() - t < 10, (path.name, time.perf_counter() - t)
            toast = " ".join(str(w.message) for w in toasts)
            assert status.startswith("**Upload refused:**") and "\n" not in status and "\n" not in toast, status
            assert path.name in toast and len(toast) < 1000, toast
            for word in words:
                assert word in toast, (word, toast)
    finally:
        faulthandler.cancel_dump_traceback_later()
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss
    assert grown < 300, f"peak RSS grew by {grown:.0f} MB"
    assert app.lock.acquire(timeout=1)
    app.lock.release()
    assert "bomber" not in app.sessions and da.list_adapters(app.pipe).keys() == loaded.keys()
    assert app.generate(request([("hra_style", 1.0)])).images


N_UPLOAD_FUZZ = 36
RAW_PYTHON_ERROR = re.compile(r"\b(KeyError|AttributeError|TypeError|IndexError|RecursionError|OverflowError|"
                              r"JSONDecodeError|UnicodeDecodeError|MemoryError|ZeroDivisionError)\b")


def test_fuzz_malformed_uploads_through_the_page_are_refused_cleanly(server, files, monkeypatch):
    """Malformed .safetensors uploads (tests/test_hostile.py's generators: mutated diffadapt
    headers, NaN/inf/integer/complex/reshaped/renamed tensors, cut or corrupted bytes; from a
    diffadapt FourierFT file, a shared HRA file and a LyCORIS file) through the page's upload
    handler: each refusal is one status line and one toast, naming the file, from a
    CheckpointError/AdapterConfigError (never a raw Python error), within seconds; the pipeline's
    tensors, the loaded and active adapters, every session's slots and the file stay unchanged."""
    import warnings

    from diffadapt.checkpoint import CheckpointError
    from diffadapt.methods import AdapterConfigError
    from tests.test_hostile import digest, make_upload_case

    app = server.app
    (upload,) = [f.fn for f in server.demo.fns.values() if f.api_name == "upload_adapter"]
    real_add, causes = app.add_upload, []

    def recording(*args, **kwargs):  # what the AdapterError the page shows came from
        try:
            return real_add(*args, **kwargs)
        except demo_app.AdapterError as exc:
            causes.append(exc.__context__)
            raise

    monkeypatch.setattr(app, "add_upload", recording)
    sources = [files.good, files.adapters / "hra_style.safetensors", files.lycoris]
    rng, cache = random.Random(1405), {}
    parts = ("unet", "text_encoder", "vae")

    def tensors_now():
        return {(c, k): (id(v), v._version) for c in parts for k, v in getattr(app.pipe, c).state_dict(keep_vars=True).items()}

    with app.lock:
        da.unmerge_adapters(app.pipe)  # a refused upload must then change no tensor at all
        base = {c: {k: v.clone() for k, v in getattr(app.pipe, c).state_dict().items()} for c in parts}
        written = tensors_now()
    loaded_before, active_before = da.list_adapters(app.pipe), da.active_adapters(app.pipe)
    views = {s: [a.key for a in app.view(s)] for s in [None, *app.sessions]}
    slots = {s: app.slots_left(s) for s in views}
    import resource

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    refused, accepted, t_start = 0, 0, time.perf_counter()
    for i in range(N_UPLOAD_FUZZ):
        path = make_upload_case(sources[i % len(sources)], files.root / "fuzz" / f"case{i}", rng, cache)
        before, session = digest(path), f"fuzz-{i}"
        causes.clear()
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as toasts:
            warnings.simplefilter("always")
            status = upload(SimpleNamespace(session_hash=session), str(path))[0]
        seconds = time.perf_counter() - t
        assert seconds < 15, (i, seconds, status)
        if status.startswith("Loaded"):  # a harmless change (e.g. a NaN in an unused key is not one)
            accepted += 1
            assert app.end_session(session) == 1
            with app.lock:  # loading made it the active one; generate() re-applies every choice anyway
                da.set_adapters(app.pipe, [n for n, _ in active_before], [w for _, w in active_before])
        else:
            refused += 1
            assert status.startswith("**Upload refused:**") and "\n" not in status and len(status) < 6000, (i, status)
            messages = [str(w.message) for w in toasts if issubclass(w.category, UserWarning)]
            assert len(messages) == 1, (i, messages)
            toast = messages[0]
            assert "\n" not in toast and len(toast) < 1000 and "Traceback" not in toast, (i, toast)
            assert path.name in toast and str(path.parent) not in toast, (i, toast)  # no server-side path
            assert "is not a readable adapter" in toast or "does not fit this pipeline" in toast, (i, toast)
            assert not RAW_PYTHON_ERROR.search(toast), (i, toast)
            assert len(causes) == 1 and isinstance(causes[0], (CheckpointError, AdapterConfigError)), (i, causes, toast)
            assert session not in app.sessions
        assert digest(path) == before, i
        assert da.list_adapters(app.pipe).keys() == loaded_before.keys() and da.active_adapters(app.pipe) == active_before
        assert {s: [a.key for a in app.view(s)] for s in views} == views and set(app.sessions) <= set(views) - {None}
        assert {s: app.slots_left(s) for s in views} == slots, i
        now = tensors_now()
        assert now == written or status.startswith("Loaded"), (i, status)  # no tensor replaced or written in place
        written = now
        if i % 12 == 11:
            for c in parts:
                for k, v in getattr(app.pipe, c).state_dict().items():
                    assert torch.equal(v, base[c][k]), (i, c, k)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    assert refused >= N_UPLOAD_FUZZ * 3 // 4, (refused, accepted)
    assert grown < 500, f"the process grew by {grown:.0f} MB"
    print(f"\nupload fuzz: {refused} refused, {accepted} accepted in {time.perf_counter() - t_start:.1f} s")


def test_browser_escapes_hostile_metadata_and_frees_the_tab_on_close(server, files, monkeypatch):
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium; .ci/run does it)")
    monkeypatch.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.2")
    app = server.app
    sessions_before = set(app.sessions)
    requested = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.on("request", lambda r: requested.append(r.url))
            page.goto(server.url)
            expect = sync_api.expect
            room = app.max_adapters - len(app.adapters)
            expect(page.locator("#slots")).to_contain_text(f"{room} of {room} upload slots left")
            page.locator("#upload input[type=file]").set_input_files(str(files.evil))
            expect(page.locator("#upload_status")).to_contain_text("Loaded hostile", timeout=60_000)
            expect(page.locator("#slots")).to_contain_text(f"{room - 1} of {room} upload slots left")
            table = page.locator("#adapters_table")
            expect(table).to_contain_text(HOSTILE["instance_prompt"])
            expect(table).to_contain_text("<script>alert(2)</script>")
            assert table.locator("img, script, code, a, strong, b, .katex").count() == 0
            expect(page.locator("#use_2")).to_be_visible()  # its slot, in this page
            (session,) = set(app.sessions) - sessions_before
            assert app.names_for(session)[-1] == "hostile"
            page.close()  # the tab goes: its session ends, its upload is deleted
            deadline = time.monotonic() + 30
            while session in app.sessions and time.monotonic() < deadline:
                time.sleep(0.2)
            assert session not in app.sessions
        finally:
            browser.close()
    assert not [u for u in requested if "evil" in u], "a file's metadata made the page fetch a URL"


def test_nan_strengths_from_the_page_are_refused(server, client):
    """gradio_client cannot even send NaN (not JSON); what the page's handler gets is still checked."""
    app = server.app
    (on_generate,) = [f.fn for f in server.demo.fns.values() if f.api_name == "generate"]
    for bad in (float("nan"), float("inf"), float("-inf")):
        args = api_args(app, [("hra_style", 1.0)])
        args[10 + app.max_adapters + app.names.index("hra_style")] = bad
        with pytest.raises(gr.Error, match=re.escape(f"Strength of adapter &#x27;hra_style&#x27; must be a finite number (got {bad})")):
            on_generate(SimpleNamespace(session_hash="nan-session"), lambda *a, **k: None, *args)
        with pytest.raises(Exception, match="JSON"):
            client.predict(*args, api_name="/generate")


@pytest.mark.parametrize("argv, words", [
    (["--max-adapters", "0"], "--max-adapters"), (["--max-upload-mb", "nan"], "--max-upload-mb"),
    (["--session-minutes", "inf"], "--session-minutes"), (["--port", "70000"], "--port"),
    (["--max-uploads", "-1"], "--max-uploads"), (["--port", "x"], "--port"),
    (["--max-grid-cells", "0"], "--max-grid-cells"), (["--max-grid-cells", "2.5"], "--max-grid-cells"),
])
def test_app_flags_are_checked_in_one_line(capsys, monkeypatch, argv, words):
    monkeypatch.setattr(demo_app, "create_app", lambda *a, **k: pytest.fail("a bad flag must stop before the model loads"))
    assert demo_app.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and words in err and "error" in err


# -- 6. ready to use: defaults from the model folder, trigger prefill ------------------------------------
def _component(demo, elem_id):
    (found,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id]
    return found


def _handlers(demo, name):
    return [f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name]


def test_defaults_come_from_the_model_folder(server, tmp_path):
    app = server.app
    # the embedded default's card: "20-25 steps and the pipeline's default guidance (7.5)"
    assert (app.default_steps, app.default_guidance) == (25, 7.5)
    assert app.defaults.sources == {"steps": "model card", "guidance": "model card"}
    assert app.examples[0] == "a large striped blue square on an orange background"  # the card's own pipe("...")
    from diffadapt.embedded import world

    assert set(world.UNRELATED_PROMPTS[:4]) <= set(app.examples) and len(app.examples) <= 8
    assert _component(server.demo, "steps").value == 25 and _component(server.demo, "guidance").value == 7.5
    examples = [b for b in server.demo.blocks.values() if type(b).__name__ == "Dataset"]
    assert examples and [row[0] for row in examples[0].raw_samples] == app.examples
    # the Hub's fields in a card's front matter win; out-of-range or broken values are ignored
    card = tmp_path / "hub" / "README.md"
    card.parent.mkdir()
    card.write_text("---\ninference:\n  parameters:\n    num_inference_steps: 4\n    guidance_scale: 0\n"
                    "widget:\n- text: a corgi in space\n- text: a red fox\n---\n# turbo\n30-50 steps, guidance 9\n")
    d = demo_app.model_defaults(card.parent, 50, 7.5)
    assert (d.steps, d.guidance, d.examples) == (4, 0.0, ["a corgi in space", "a red fox"])
    card.write_text("# prose only\nUse 30 to 40 sampling steps with a guidance scale of 5.\n"
                    "```python\nimage = pipe(\"an astronaut riding a horse\").images[0]\n```\n")
    d = demo_app.model_defaults(card.parent, 50, 7.5)
    assert (d.steps, d.guidance, d.examples, d.sources["steps"]) == (40, 5.0, ["an astronaut riding a horse"], "model card")
    card.write_text("---\ninference: {parameters: {num_inference_steps: 100000, guidance_scale: .nan}}\n---\n")
    assert (demo_app.model_defaults(card.parent, 30, 6.0).steps, demo_app.model_defaults(card.parent, 30, 6.0).guidance) == (30, 6.0)
    card.write_text("---\n: [broken yaml\n---\nfewer than ~10 steps get blurry\n")
    d = demo_app.model_defaults(card.parent, None, None)
    assert (d.steps, d.guidance, d.sources) == (25, 7.5, {"steps": "fallback", "guidance": "fallback"})
    d = demo_app.model_defaults(tmp_path / "no_card", 50, 7.5)  # no card at all: the pipeline's own defaults
    assert (d.steps, d.guidance, d.examples, d.sources["steps"]) == (50, 7.5, [], "pipeline signature")


def test_trigger_prompts_prefill_the_prompt(server, files):
    app = server.app
    assert demo_app.trigger_of({"instance_prompt": "a photo of sks dog", "trigger": "x"}) == "a photo of sks dog"
    assert demo_app.trigger_of({"modelspec.trigger_phrase": "  zwx   style "}) == "zwx style"  # kohya's sd-scripts
    assert demo_app.trigger_of({"trigger_words": ["a", "b"]}) == "a, b" and demo_app.trigger_of({"base_model": "x"}) == ""
    assert [a.trigger for a in app.adapters] == [PROMPT, "in zwx style"]
    # the page opens with the shared adapters checked and their triggers as the prompt
    assert [_component(server.demo, f"use_{i}").value for i in range(app.max_adapters)] == [True, True] + [False] * 6
    assert _component(server.demo, "prompt").value == f"{PROMPT}, in zwx style" == app.prefill([True, True])
    assert app.prefill([False, True]) == "in zwx style" and app.prefill([]) == app.examples[0]
    assert app.prompt_after("", "anything", [True, False]) == PROMPT  # an empty prompt is always filled
    assert app.prompt_after(f"{PROMPT}, in zwx style", f"{PROMPT},  in zwx style", [False, True]) == "in zwx style"
    assert app.prompt_after(PROMPT, app.examples[0], [False, True]) is None  # the visitor's text, even if a trigger
    assert app.prompt_after(PROMPT, PROMPT, [True, False]) is None  # unchanged: nothing to do
    # the page's checkbox handlers (one per slot): (prompt, what the page last put there)
    handlers = _handlers(server.demo, "on_use")
    assert len(handlers) == app.max_adapters
    visitor = SimpleNamespace(session_hash="prefill-visitor")
    rest = [False] * (app.max_adapters - 2)
    opened = f"{PROMPT}, in zwx style"
    assert handlers[1](visitor, opened, opened, True, False, *rest) == (PROMPT, PROMPT)  # slot 1 unchecked
    assert handlers[0](visitor, PROMPT, PROMPT, False, False, *rest) == (app.examples[0],) * 2  # none left: an example
    assert handlers[1](visitor, app.examples[0], app.examples[0], False, True, *rest) == ("in zwx style",) * 2
    skip = type(gr.skip())
    assert all(isinstance(v, skip) for v in handlers[0](visitor, "my own words", opened, True, True, *rest))
    assert all(isinstance(v, skip) for v in handlers[0](visitor, PROMPT, app.examples[0], True, False, *rest))
    # an upload is checked, and its trigger joins an untouched prompt
    (upload,) = [f.fn for f in server.demo.fns.values() if f.api_name == "upload_adapter"]
    try:
        out = upload(visitor, str(files.good), opened, opened, True, True, *rest)
        assert "Loaded **fourier_late**" in out[0] and out[-2:] == [f"{opened}, qwe"] * 2
        checkboxes = out[3 + app.max_adapters : 3 + 2 * app.max_adapters]  # after status, table, slots, rows
        assert checkboxes[2]["value"] is True and checkboxes[2]["label"] == "fourier_late"
        assert all("value" not in c for i, c in enumerate(checkboxes) if i != 2)  # the others stay as they are
        out = upload(visitor, str(files.oft), "my own words", f"{opened}, qwe", True, True, True, *rest[1:])
        assert all(isinstance(v, skip) for v in out[-2:]) and out[3 + app.max_adapters + 3]["value"] is True
    finally:
        app.end_session("prefill-visitor")


# -- 7. the strength grid ---------------------------------------------------------------------------------
def test_grid_cells_are_exactly_single_generations(server, client):
    app = server.app
    calls = []
    res = app.grid(request([("boft_subject", 0.3), ("hra_style", 1.0)]), "0, 0.5, 1", lambda i, n: calls.append((i, n)))
    assert (res.rows, res.strengths, res.cell_size, res.seed) == (["boft_subject", "hra_style"], [0.0, 0.5, 1.0], (SIZE, SIZE), 0)
    x, y = res.origin
    assert res.image.size == (x + 3 * SIZE, y + 2 * SIZE) and x > 0 and y > 0
    assert calls == [(i, 6 * STEPS) for i in range(1, 6 * STEPS + 1)]
    grid = pixels(res.image)
    assert (grid[:y] < 128).any() and (grid[:, :x] < 128).any(), "the labels are drawn"
    base = pixels(app.generate(request()).images[0])
    for r, name in enumerate(res.rows):
        for c, strength in enumerate(res.strengths):
            cell = pixels(res.image.crop(res.cell_box(r, c)))
            np.testing.assert_array_equal(cell, pixels(res.cells[r][c]))
            np.testing.assert_array_equal(cell, pixels(app.generate(request([(name, strength)])).images[0]),
                                          err_msg=f"{name} @ {strength}")
        np.testing.assert_array_equal(pixels(res.cells[r][0]), base)  # strength 0: the base model
        assert not np.array_equal(pixels(res.cells[r][2]), base)
    # merged mode, a random seed (one for every cell), and the page's /grid endpoint
    res = app.grid(request([("hra_style", 1.0)], mode="merged", seed=None), [0, 1])
    for c, strength in enumerate([0, 1]):
        single = app.generate(request([("hra_style", strength)], mode="merged", seed=res.seed)).images[0]
        np.testing.assert_array_equal(pixels(res.cells[0][c]), pixels(single))
    gallery, info, details = client.predict(*api_args(app, [("boft_subject", 1.0)]), "0 1", api_name="/grid")
    direct = app.grid(request([("boft_subject", 1.0)]), [0, 1])
    assert details["grid"] == {"rows": ["boft_subject"], "strengths": [0.0, 1.0], "origin": list(direct.origin),
                               "cell_size": [SIZE, SIZE], "size": list(direct.image.size)}
    assert "Grid:" in info and "1 adapter(s) x 2 strength(s)" in info and len(gallery) == 1
    np.testing.assert_array_equal(pixels(gallery[0]["image"]), pixels(direct.image))


def test_grid_over_the_cell_limit_is_refused_in_one_line(server):
    app = server.app
    calls = []
    limit = app.max_grid_cells
    try:
        app.max_grid_cells = 3
        with pytest.raises(ValueError) as refused:
            app.grid(request([("boft_subject", 1.0), ("hra_style", 1.0)]), "0, 1", lambda i, n: calls.append(i))
        message = str(refused.value)
        assert message == ("Grid: 2 adapter(s) x 2 strength(s) = 4 images is over this demo's limit of 3; "
                           "check fewer adapters or give fewer strengths.")
        assert not calls, "refused before anything is rendered"
        (on_grid,) = [f.fn for f in server.demo.fns.values() if f.api_name == "grid"]
        args = api_args(app, [("boft_subject", 1.0), ("hra_style", 1.0)])
        with pytest.raises(gr.Error, match="over this demo&#x27;s limit of 3"):
            on_grid(SimpleNamespace(session_hash="grid-visitor"), lambda *a, **k: None, *args, "0, 1")
        assert len(app.grid(request([("hra_style", 1.0)]), "0 0.5 1").cells[0]) == 3  # 3 cells: at the limit, fine
    finally:
        app.max_grid_cells = limit
    for strengths, adapters, words in [
        ("0, x", [("hra_style", 1.0)], "Grid strengths: 'x' is not a number; give a list such as 0, 0.5, 1."),
        ("0, nan", [("hra_style", 1.0)], "Grid strengths must be finite numbers (got 'nan')."),
        ("  ", [("hra_style", 1.0)], "Grid strengths: give at least one number"),
        ("0, 1", [], "Grid: check at least one adapter (the grid's rows)."),
        ("0, 1", [("nope", 1.0)], "Unknown adapter(s) ['nope']"),
    ]:
        with pytest.raises(ValueError, match=re.escape(words)):
            app.grid(request(adapters), strengths)
    assert demo_app.parse_strengths("0;0.25 , 1.5,-1") == [0.0, 0.25, 1.5, -1.0]


def test_a_shared_lycoris_adapter_given_at_start(server, files):
    """``app.py --adapters comfy.safetensors``: read against the pipeline, like an upload (runs last:
    it loads a second pipeline)."""
    app = demo_app.create_app(str(files.model), [str(files.lycoris)])
    assert app.names == ["comfy_oft"] and app.adapters[0].method == "oft" and app.adapters[0].owner is None
    server.app.add_upload(files.lycoris, session="twin")
    try:
        np.testing.assert_array_equal(pixels(app.generate(request([("comfy_oft", 0.6)])).images[0]),
                                      pixels(server.app.generate(request([("comfy_oft", 0.6)]), session="twin").images[0]))
    finally:
        server.app.end_session("twin")
