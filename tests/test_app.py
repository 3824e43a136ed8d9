"""Tests of the Streamlit app (app/main.py, app/generation.py) with streamlit.testing.v1.AppTest.

    OMP_NUM_THREADS=1 python -m pytest tests/test_app.py -q

AppTest runs the page in this process against the tiny random-weights bundle (tests/conftest.py):
generation, the gallery, per-session state, the model lock, captioning and the error messages.
The real-browser test is tests/test_app_browser.py.
"""

from __future__ import annotations

import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import streamlit.config
import torch
from PIL import Image
from streamlit.testing.v1 import AppTest

from app.generation import (MAX_PROMPT_CHARS, MODEL_LOCK, PENDING, GenerationJob, GenerationRequest, check_prompt,
                            preview_images, read_image, sampling_threads, to_png)
from mars.shapes import random_scene, render, score

REPO = Path(__file__).resolve().parents[1]
APP = str(REPO / "app" / "main.py")
PENDING_PIXEL = round((PENDING + 1) * 127.5)
WIDGET_KINDS = {"super_resolution": "toggle", "seed": "number_input", "top_k": "number_input"}  # others: sliders


@pytest.fixture(autouse=True)
def server_address():
    """Streamlit's server.address for one test (the page refuses to serve off loopback), restored after.
    Loopback unless a test says otherwise, wherever pytest runs from (.streamlit/config.toml is only read
    from the repository root)."""
    before = streamlit.config.get_option("server.address")
    streamlit.config.set_option("server.address", "127.0.0.1")
    yield lambda address: streamlit.config.set_option("server.address", address)
    streamlit.config.set_option("server.address", before)


def open_app(monkeypatch, checkpoint) -> AppTest:
    monkeypatch.setenv("MARS_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("MARS_DEVICE", "cpu")  # where tiny_pipe runs, so the pixels can be compared
    monkeypatch.setenv("MARS_APP_THREADS", str(torch.get_num_threads()))  # leave this process's torch as it is
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    return at


def wait_for_job(at: AppTest, timeout: float = 30.0) -> AppTest:
    """Rerun the page (as the polling fragment does) until the session's job is filed."""
    deadline = time.monotonic() + timeout
    while at.session_state.job is not None:
        assert time.monotonic() < deadline, "generation did not finish in time"
        time.sleep(0.05)
        at.run()
    assert not at.exception, at.exception
    return at


def generate(at: AppTest, prompt: str, **settings) -> AppTest:
    at.text_area(key="prompt").input(prompt)
    for key, value in settings.items():
        getattr(at, WIDGET_KINDS.get(key, "slider"))(key=key).set_value(value)
    return at.button(key="generate").click().run()


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


# --- the page --------------------------------------------------------------------------------------

def test_generate_fills_the_gallery_with_the_pipelines_images(monkeypatch, tiny_bundle, tiny_pipe):
    at = open_app(monkeypatch, tiny_bundle)
    assert at.session_state.gallery == [] and "Nothing yet: type a prompt and click Generate." in at.caption.values
    wait_for_job(generate(at, "a red circle", seed=3, num_images=2, guidance_scale=2.0))
    gallery = at.session_state.gallery
    expected = tiny_pipe("a red circle", guidance_scale=2.0, num_images_per_prompt=2,
                         generator=torch.Generator().manual_seed(3)).images
    assert [item.size for item in gallery] == [256, 256]
    # a thin client: the same pixels as calling MarsPipeline with the same seed (newest first)
    assert all(np.array_equal(pixels(item.png), np.asarray(image)) for item, image in zip(gallery, expected[::-1]))
    assert len(at.get("download_button")) == 2 and len(at.image) == 2
    assert "**a red circle**" in at.markdown.values
    assert any("seed 3" in text and "CFG 2" in text and "SR on" in text for text in at.caption.values)

    wait_for_job(generate(at, "两个蓝色的正方形", super_resolution=False, num_images=1))  # other settings stay
    gallery = at.session_state.gallery
    assert len(gallery) == 3 and gallery[0].prompt == "两个蓝色的正方形" and gallery[0].size == 128
    assert len({item.serial for item in gallery}) == 3 and len(at.get("download_button")) == 3
    assert not at.error and not at.exception
    # Streamlit's gc.collect() after each (polling) rerun would starve the sampling thread of the GIL
    assert streamlit.config.get_option("runner.postScriptGC") is False


def test_the_shipped_default_model_draws_the_prompt(monkeypatch):
    monkeypatch.delenv("MARS_CHECKPOINT", raising=False)  # the page's default: checkpoints/mars-shapes
    monkeypatch.setenv("MARS_DEVICE", "cpu")
    monkeypatch.setenv("MARS_APP_THREADS", str(torch.get_num_threads()))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert at.session_state.checkpoint == "checkpoints/mars-shapes"
    wait_for_job(generate(at, "a red circle", seed=0, num_images=2), timeout=120)
    gallery = at.session_state.gallery
    assert [item.size for item in gallery] == [256, 256] and len(at.image) == 2
    verdicts = [score("a red circle", Image.open(io.BytesIO(item.png))) for item in gallery]
    assert any(v.passed for v in verdicts), [v.objects for v in verdicts]  # a trained model, not noise


@pytest.mark.parametrize("prompt, message", [
    ("   ", "Type a prompt first"),
    ("a red circle " * 30, f"characters long; the limit is {MAX_PROMPT_CHARS}"),
])
def test_bad_prompts_are_refused_with_a_message(monkeypatch, tiny_bundle, prompt, message):
    at = generate(open_app(monkeypatch, tiny_bundle), prompt)
    assert [message in error.value for error in at.error] == [True]
    assert at.session_state.job is None and at.session_state.gallery == [] and not at.exception


@pytest.mark.parametrize("address", [None, "0.0.0.0", "192.168.1.20", "myhost.example"])
def test_the_page_refuses_to_serve_the_model_off_loopback(monkeypatch, tiny_bundle, server_address, address):
    server_address(address)
    monkeypatch.setenv("MARS_CHECKPOINT", str(tiny_bundle))
    monkeypatch.delenv("MARS_APP_NETWORK", raising=False)
    at = AppTest.from_file(APP, default_timeout=60).run()
    (error,) = at.error
    assert error.value.startswith("Not serving the model: this server listens ")
    assert "--server.address 127.0.0.1" in error.value and "MARS_APP_NETWORK=1" in error.value
    assert len(at.text_area) == 0 and not at.exception  # no prompt box: the model is not offered
    monkeypatch.setenv("MARS_APP_NETWORK", "1")  # on purpose: served
    assert len(open_app(monkeypatch, tiny_bundle).text_area) == 1


@pytest.mark.parametrize("address", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_addresses_serve_the_model(monkeypatch, tiny_bundle, server_address, address):
    server_address(address)
    monkeypatch.delenv("MARS_APP_NETWORK", raising=False)
    assert len(open_app(monkeypatch, tiny_bundle).text_area) == 1


def test_the_model_picker_lists_the_shipped_bundles_and_takes_another_folder(monkeypatch, tiny_bundle):
    shipped = sorted(f"checkpoints/{index.parent.name}" for index in (REPO / "checkpoints").glob("*/model_index.json"))
    assert "checkpoints/mars-shapes" in shipped
    at = open_app(monkeypatch, tiny_bundle)  # a folder that is not shipped: "another folder", typed in
    (picker,) = at.selectbox
    assert picker.options == shipped + ["Another folder…"] and picker.value == "Another folder…"
    assert at.text_input(key="checkpoint_text").value == str(tiny_bundle) and not at.error
    at.text_input(key="checkpoint_text").set_value(str(tiny_bundle / "missing")).run()
    assert "Cannot load the model" in at.error[0].value and at.session_state.checkpoint == str(tiny_bundle / "missing")
    for named in (shipped[0], str(REPO / shipped[0])):  # a shipped bundle, relative or absolute: chosen in the list
        monkeypatch.setenv("MARS_CHECKPOINT", named)
        at = AppTest.from_file(APP, default_timeout=60).run()
        assert at.selectbox[0].value == shipped[0] and len(at.text_input) == 0 and not at.error


def test_the_prompt_box_shows_the_bundles_own_examples(monkeypatch, tiny_bundle, tmp_path):
    at = open_app(monkeypatch, tiny_bundle)  # a bundle without examples: the shapes world's
    assert at.text_area(key="prompt").placeholder == "a red circle to the left of a blue square · 两个绿色的三角形"
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    index = json.loads((bundle / "model_index.json").read_text())
    (bundle / "model_index.json").write_text(json.dumps(index | {"examples": ["red apple, soft shaded style",
                                                                              "红苹果，柔和渐变风格"]}))
    at = open_app(monkeypatch, bundle)
    assert at.text_area(key="prompt").placeholder == "red apple, soft shaded style · 红苹果，柔和渐变风格"


def test_a_missing_checkpoint_is_reported_in_the_page(monkeypatch, tmp_path):
    at = open_app(monkeypatch, tmp_path / "no-such-bundle")
    (error,) = at.error
    assert "Cannot load the model" in error.value and "no-such-bundle" in error.value
    assert "model_index.json not found" in error.value
    assert len(at.text_area) == 0 and not at.exception  # nothing to generate with


def test_words_the_model_never_saw_are_flagged_but_still_sampled(monkeypatch, tiny_bundle):
    at = wait_for_job(generate(open_app(monkeypatch, tiny_bundle), "a red circle beside a zebra"))
    assert any("zebra" in warning.value for warning in at.warning)
    assert len(at.session_state.gallery) == 1


def test_sessions_take_turns_on_the_model_and_keep_their_own_state(monkeypatch, tiny_bundle):
    first, second = open_app(monkeypatch, tiny_bundle), open_app(monkeypatch, tiny_bundle)
    second.number_input(key="seed").set_value(11).run()
    with MODEL_LOCK:  # another session is sampling
        generate(first, "a green square", seed=5)
        assert first.session_state.job.state == "queued"
        assert any("Queued" in info.value for info in first.info)
        first.button(key="generate").click().run()  # a second click while the first waits
        assert any("Still generating your previous prompt" in w.value for w in first.warning)
    wait_for_job(first)
    second.run()
    assert len(first.session_state.gallery) == 1  # the second click was refused, not queued twice
    assert second.session_state.gallery == [] and second.session_state.seed == 11
    assert first.session_state.seed == 5


def test_random_seed_button_picks_a_new_seed(monkeypatch, tiny_bundle):
    at = open_app(monkeypatch, tiny_bundle)
    seeds = set()
    for _ in range(3):
        seeds.add(at.button(key="random_seed").click().run().session_state.seed)
    assert len(seeds) == 3 and at.number_input(key="seed").value in seeds


def test_caption_tab_captions_uploads_and_rejects_unreadable_ones(monkeypatch, tiny_bundle, tiny_pipe):
    at = open_app(monkeypatch, tiny_bundle)
    at.file_uploader(key="upload").set_value(("broken.png", b"\x89PNG\r\n\x1a\n not really", "image/png")).run()
    (error,) = at.error
    assert "broken.png is not a readable image" in error.value and not at.exception

    image = render(random_scene(np.random.default_rng(0)), 128)
    at.file_uploader(key="upload").set_value(("scene.png", to_png(image), "image/png")).run()
    assert not at.error
    at.button(key="caption_button").click().run()
    (success,) = at.success
    assert success.value == (tiny_pipe.caption(image).strip() or "(the model wrote nothing)")


@pytest.mark.parametrize("image, message", [
    (Image.new("RGB", (128, 128), "white"), "blank.png is blank (a single colour): there is nothing to caption"),
    (Image.new("RGB", (8, 8), "red"), "blank.png is 8 x 8 pixels, too small to caption"),
])
def test_caption_tab_refuses_blank_and_tiny_images_before_captioning(monkeypatch, tiny_bundle, image, message):
    at = open_app(monkeypatch, tiny_bundle)
    at.file_uploader(key="upload").set_value(("blank.png", to_png(image), "image/png")).run()
    (error,) = at.error
    assert error.value.startswith(message) and not at.exception
    assert "caption_button" not in [button.key for button in at.button]  # nothing to click


# --- the engine, directly --------------------------------------------------------------------------

def test_check_prompt_strips_and_limits():
    assert check_prompt("  一个红色的圆形 \n") == "一个红色的圆形"
    assert check_prompt("x" * MAX_PROMPT_CHARS) == "x" * MAX_PROMPT_CHARS
    for bad in ("", None, "x" * (MAX_PROMPT_CHARS + 1)):
        with pytest.raises(ValueError):
            check_prompt(bad)


def test_sampling_threads_leave_the_server_a_core(monkeypatch):
    monkeypatch.delenv("MARS_APP_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert sampling_threads() == 7
    monkeypatch.setattr("os.cpu_count", lambda: 1)
    assert sampling_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert sampling_threads() == 2
    monkeypatch.setenv("MARS_APP_THREADS", "5")
    assert sampling_threads() == 5
    monkeypatch.setenv("MARS_APP_THREADS", "lots")  # not a count: ignored
    assert sampling_threads() == 2


def test_read_image_names_the_file_and_flattens_transparency():
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    assert read_image(to_png(rgba), "clear.png").getpixel((3, 3)) == (255, 255, 255)
    truncated = to_png(Image.new("RGB", (64, 64), "red"))[:60]
    for data in (b"", b"GIF89a nonsense", truncated):
        with pytest.raises(ValueError, match="upload.png is not a readable image"):
            read_image(data, "upload.png")


def test_preview_decodes_finished_rows_and_greys_the_rest(tiny_pipe):
    vq, (h, w) = tiny_pipe.vq, tiny_pipe.model.config.image_grid
    f, codes = vq.downsample, torch.randint(0, vq.codebook_size, (2, h * w), generator=torch.Generator().manual_seed(0))
    full = [np.asarray(image) for image in preview_images(vq, codes, (h, w))]
    decoded = [np.asarray(image) for image in preview_images(vq, codes.view(2, h, w), (h, w))]
    assert all(np.array_equal(a, b) for a, b in zip(full, decoded))  # the last step shows the final grid

    n = 2 * w + 3  # two rows and three codes sampled
    partial = np.asarray(preview_images(vq, codes[:, :n], (h, w))[1])
    assert partial.shape == (h * f, w * f, 3)
    assert (partial[3 * f:] == PENDING_PIXEL).all() and (partial[2 * f: 3 * f, 3 * f:] == PENDING_PIXEL).all()
    assert partial[: 2 * f].std() > 0 and partial[2 * f: 3 * f, : 3 * f].std() > 0


def test_job_previews_every_few_steps_and_ends_on_the_result(monkeypatch, tiny_pipe):
    import app.generation as generation

    seen = []

    def recording_preview(vq, codes, grid):
        seen.append(tuple(codes.shape))
        return preview_images(vq, codes, grid)

    monkeypatch.setattr(generation, "preview_images", recording_preview)
    request = GenerationRequest(prompt="a blue triangle", seed=1, super_resolution=True)
    job = GenerationJob(tiny_pipe, request, preview_updates=4).start()
    assert job.wait(timeout=60) and job.state == "done", job.error
    sr_groups = tiny_pipe.superres.config.num_groups
    assert seen == [(1, n) for n in (16, 32, 48, 64)] + [(1, 16, 16)] * 4
    assert (job.phase, job.step, job.total) == ("superres", sr_groups, sr_groups)
    assert np.array_equal(np.asarray(job.preview[0]), np.asarray(job.images[0]))


def test_a_failing_job_reports_one_line(tiny_pipe):
    job = GenerationJob(tiny_pipe, GenerationRequest(prompt="a red circle", num_images=0)).start()
    assert job.wait(timeout=30) and job.state == "failed"
    assert job.error.startswith("Generation failed: ") and "\n" not in job.error
    assert not MODEL_LOCK.locked()
