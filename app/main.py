"""MARS in the browser: type a prompt (English or Chinese), tune the sampler, watch the image form.

    streamlit run app/main.py --server.address 127.0.0.1        # the shipped default model
    MARS_CHECKPOINT=runs/shapes/bundle streamlit run app/main.py --server.address 127.0.0.1
    MARS_DEVICE=cpu MARS_APP_THREADS=8 streamlit run app/main.py --server.address 127.0.0.1  # device; CPU threads
    MARS_APP_NETWORK=1 streamlit run app/main.py --server.address 0.0.0.0  # on a network, on purpose

The page serves the model only on a loopback address (127.0.0.1, ::1, localhost; the repository's
.streamlit/config.toml sets 127.0.0.1 when streamlit runs from the repository root): with
server.address unset Streamlit listens on every interface, so anyone who can reach the machine could
use it. To serve on a network on purpose, set MARS_APP_NETWORK=1 (and put an authenticating proxy in
front: the app has no logins).

A thin client of MarsPipeline, like sample.py. The model is loaded once per process
(st.cache_resource, keyed by the checkpoint directory); every browser session keeps its own
settings and gallery in st.session_state. Sampling runs in a background thread (app/generation.py)
under one process-wide lock, so the page stays live, shows a preview decoded every few steps, and
sessions take turns on the shared model. Tests: pytest tests/test_app.py tests/test_app_browser.py
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import random
import re
import sys
from pathlib import Path

import streamlit as st
from streamlit import config as streamlit_config

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `streamlit run app/main.py` puts app/ on sys.path, not the repo
    sys.path.insert(0, str(REPO))

from app.generation import (MODEL_LOCK, GalleryItem, GenerationJob, GenerationRequest, check_prompt,  # noqa: E402
                            read_image, sampling_threads, unknown_words)
from mars.cli import DEFAULT_CHECKPOINT as CLI_DEFAULT_CHECKPOINT  # noqa: E402
from mars.device import resolve_device  # noqa: E402
from mars.errors import first_line  # noqa: E402
from mars.images import check_caption_image  # noqa: E402

CHECKPOINT_ENV = "MARS_CHECKPOINT"
NETWORK_ENV = "MARS_APP_NETWORK"  # "1": serve on a non-loopback server.address on purpose
DEVICE_ENV = "MARS_DEVICE"  # e.g. cpu, cuda, cuda:1 (default: cuda when available)
DEFAULT_CHECKPOINT = str(CLI_DEFAULT_CHECKPOINT.relative_to(REPO))  # shown relative in the page
POLL_SECONDS = 0.3  # how often the progress panel refreshes while a job runs
CAPTION_WAIT_SECONDS = 300
MAX_GALLERY = 48  # per session; the oldest images drop off
GALLERY_COLUMNS = 3
UPLOAD_TYPES = ["png", "jpg", "jpeg", "webp", "bmp", "gif"]
EXAMPLES = "a red circle to the left of a blue square · 两个绿色的三角形"
OTHER_MODEL = "Another folder…"  # the model picker's last entry: a bundle typed in

log = logging.getLogger("mars.app")

# Streamlit runs a full gc.collect() after every script run. With torch loaded that holds the GIL
# for 0.1-0.3 s, and the progress panel reruns several times a second: the sampling thread starved
# (measured: the tiny model's 1 s job took 10 s in the server). Python's generational GC still runs.
streamlit_config.set_option("runner.postScriptGC", False)
# A local model has nothing to deploy: the toolbar keeps only what a reader of the page needs.
streamlit_config.set_option("client.toolbarMode", "minimal")
# Shapes are drawn on white, as is the page: a thin frame on a light card shows where an image ends.
IMAGE_CSS = """<style>[data-testid="stImage"] img {border: 1px solid #c9ced6; border-radius: 6px;
    background: #f4f6f9; padding: 4px;}</style>"""


@st.cache_resource(show_spinner="Loading the model…", max_entries=2)
def load_pipeline(checkpoint: str):
    """One MarsPipeline per checkpoint directory and process; a failed load is not cached."""
    import torch

    from mars.pipeline import MarsPipeline

    device = resolve_device(os.environ.get(DEVICE_ENV), DEVICE_ENV)
    if device.type == "cpu":
        torch.set_num_threads(sampling_threads())
    return MarsPipeline.from_pretrained(checkpoint, device=device)


def network_refusal() -> str | None:
    """Why this server must not serve the model (server.address unset, so every interface, or not a
    loopback address, without MARS_APP_NETWORK=1), or None."""
    address = (streamlit_config.get_option("server.address") or "").strip()
    if os.environ.get(NETWORK_ENV, "").strip() == "1" or address == "localhost":
        return None
    try:
        if ipaddress.ip_address(address.strip("[]")).is_loopback:
            return None
    except ValueError:  # unset, or a host name
        pass
    where = f"on {address}" if address else "on every network interface (server.address is not set)"
    return (f"Not serving the model: this server listens {where}, so anyone who can reach this machine could "
            "use it. Restart it with `streamlit run app/main.py --server.address 127.0.0.1`, or, to serve it on a "
            f"network on purpose, set {NETWORK_ENV}=1.")


def shipped_bundles() -> list[str]:
    """The bundles under the repository's checkpoints/ (a folder with a model_index.json), relative to it."""
    return sorted(str(index.parent.relative_to(REPO)) for index in (REPO / "checkpoints").glob("*/model_index.json"))


def model_picker() -> str:
    """The checkpoint to load: a shipped bundle from the list, or any bundle folder typed in (the list's last
    entry). $MARS_CHECKPOINT chooses the first one shown; the browser tab keeps the choice."""
    bundles = shipped_bundles()
    if "model" not in st.session_state:
        start = st.session_state.checkpoint
        # an absolute path to a shipped bundle is that bundle: the list shows its name, not "another folder"
        target = Path(resolve_checkpoint(start))
        start = next((b for b in bundles if (REPO / b).resolve() == target), start)
        st.session_state.model = start if start in bundles else OTHER_MODEL
        st.session_state.checkpoint_text = start
    choice = st.selectbox("Model", bundles + [OTHER_MODEL], key="model",
                          help="the bundles shipped in checkpoints/, or another folder")
    if choice == OTHER_MODEL:
        choice = st.text_input("Checkpoint directory", key="checkpoint_text",
                               help=f"a bundle from `python -m train.pipeline` (default: ${CHECKPOINT_ENV})")
    st.session_state.checkpoint = choice
    return choice


def resolve_checkpoint(text: str) -> str:
    """A relative directory means the current one, else the repository's (where checkpoints/ lives)."""
    path = Path(text.strip()).expanduser()
    if not path.is_absolute() and not path.exists() and (REPO / path).exists():
        path = REPO / path
    return str(path.resolve())


def escape_markdown(text: str) -> str:
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$])", r"\\\1", text)


def init_session() -> None:
    defaults = {"gallery": [], "job": None, "serial": 0, "notice": None, "prompt_warning": None, "caption": None,
                "seed": 0, "checkpoint": os.environ.get(CHECKPOINT_ENV) or DEFAULT_CHECKPOINT}
    for key, value in defaults.items():
        st.session_state.setdefault(key, value)


def random_seed() -> None:
    st.session_state.seed = random.randrange(2**31)


def collect_finished_job() -> None:
    """Move a finished job's images into this session's gallery (or its error into a notice)."""
    job: GenerationJob | None = st.session_state.job
    if job is None or not job.finished:
        return
    st.session_state.job = None
    if job.state == "failed":
        st.session_state.notice = job.error
        return
    items = []
    for item in job.gallery_items():
        st.session_state.serial += 1
        items.append(dataclasses.replace(item, serial=st.session_state.serial))
    st.session_state.gallery = (items[::-1] + st.session_state.gallery)[:MAX_GALLERY]


# ----------------------------------------------------------------------------- page parts

def sampler_controls(pipe) -> GenerationRequest:
    """Sidebar widgets -> the request to sample (prompt filled in later)."""
    st.header("Sampler")
    tuned = pipe.sampling  # the bundle's settings start the controls
    st.slider("Guidance scale (CFG)", 1.0, 10.0, float(tuned["guidance_scale"]), 0.5, key="guidance_scale",
              help="1 = no classifier-free guidance; higher follows the prompt more closely")
    st.slider("Temperature", 0.0, 2.0, float(tuned["temperature"]), 0.05, key="temperature",
              help="0 = always the most likely code")
    codebook = pipe.model.config.codebook_size
    if st.session_state.get("top_k", 0) > codebook:  # kept from a checkpoint with a larger codebook
        st.session_state.top_k = codebook
    st.number_input("Top-k (0 = off)", 0, codebook, min(tuned["top_k"] or 0, codebook), key="top_k")
    st.slider("Top-p", 0.05, 1.0, float(tuned["top_p"]), 0.05, key="top_p")
    st.slider("Candidates", 1, 8, min(int(tuned["candidates"]), 8), key="candidates",
              help="base images sampled per image shown; the one whose prompt the model's own image-to-text "
                   "finds likeliest is kept")
    seed_box, dice = st.columns(2, vertical_alignment="bottom")
    seed_box.number_input("Seed", 0, 2**31 - 1, step=1, key="seed")
    dice.button("Random", icon=":material/casino:", on_click=random_seed, key="random_seed", width="stretch")
    st.slider("Images", 1, 4, 1, key="num_images")
    has_superres = pipe.superres is not None
    st.toggle(f"Super-resolution to {2 * pipe.image_size} px" if has_superres else "Super-resolution",
              value=has_superres, disabled=not has_superres, key="super_resolution",
              help=None if has_superres else "this checkpoint has no super-resolution model")
    state = st.session_state
    return GenerationRequest(prompt="", guidance_scale=float(state.guidance_scale),
                             temperature=float(state.temperature), top_k=int(state.top_k),
                             top_p=float(state.top_p), candidates=int(state.candidates), seed=int(state.seed),
                             num_images=int(state.num_images),
                             super_resolution=has_superres and bool(state.super_resolution))


def start_generation(pipe, request: GenerationRequest) -> None:
    job: GenerationJob | None = st.session_state.job
    if job is not None and not job.finished:
        st.warning("Still generating your previous prompt: wait for it to finish, then click Generate again.")
        return
    try:
        prompt = check_prompt(st.session_state.prompt)
    except ValueError as error:
        st.error(str(error))
        return
    unknown = unknown_words(pipe, prompt)
    st.session_state.prompt_warning = None if not unknown else (
        f"The model never saw {', '.join(repr(piece) for piece in unknown)}: each reads as an unknown word. "
        "Words from the shapes-world captions work best.")  # shown until the next Generate
    st.session_state.job = GenerationJob(pipe, dataclasses.replace(request, prompt=prompt), MODEL_LOCK).start()


def progress_panel() -> None:
    """The running job's state and latest preview; a fragment that polls while the job runs."""
    job: GenerationJob | None = st.session_state.job
    if job is None:
        return
    if job.finished:
        st.rerun()  # the full run files the result into the gallery
    if job.state == "queued":
        st.info("Queued: another session is using the model. Yours starts as soon as it finishes.",
                icon=":material/hourglass_top:")
    else:
        side = job.pipe.image_size
        phase = (f"Super-resolving to {2 * side} px" if job.phase == "superres" else f"Sampling the {side} px image")
        st.progress(job.step / max(job.total, 1), text=f"{phase}: step {job.step} of {job.total}")
    if job.preview:
        st.image(job.preview, width=256, alt=["preview"] * len(job.preview))


def gallery() -> None:
    items: list[GalleryItem] = st.session_state.gallery
    st.subheader(f"Your images ({len(items)})")
    if not items:
        st.caption("Nothing yet: type a prompt and click Generate.")
        return
    columns = st.columns(GALLERY_COLUMNS)
    for index, item in enumerate(items):
        with columns[index % GALLERY_COLUMNS]:
            st.image(item.png, width=256, alt=item.prompt)
            st.markdown(f"**{escape_markdown(item.prompt)}**")
            st.caption(f"{item.size} px · {item.settings}")
            st.download_button("Download PNG", item.png, file_name=item.file_name, mime="image/png",
                               key=f"download-{item.serial}", on_click="ignore", icon=":material/download:")


def generate_tab(pipe, request: GenerationRequest) -> None:
    examples = " · ".join(pipe.examples) if pipe.examples else EXAMPLES  # the bundle's, else the shapes world's
    st.text_area("Prompt, in English or Chinese", key="prompt", placeholder=examples, height=90)
    if st.button("Generate", type="primary", key="generate"):
        start_generation(pipe, request)
    if st.session_state.prompt_warning:
        st.warning(st.session_state.prompt_warning)
    notice = st.session_state.notice
    if notice:
        st.error(notice)
        st.session_state.notice = None
    job = st.session_state.job
    running = job is not None and not job.finished
    st.fragment(progress_panel, run_every=POLL_SECONDS if running else None)()
    gallery()


def caption_image(pipe, image) -> str:
    """pipe.caption under the model lock (waiting, visibly, while another session samples)."""
    if not MODEL_LOCK.acquire(blocking=False):
        with st.spinner("Waiting for the model: another request is sampling…"):
            if not MODEL_LOCK.acquire(timeout=CAPTION_WAIT_SECONDS):
                raise TimeoutError(f"the model stayed busy for {CAPTION_WAIT_SECONDS} s: try again later")
    try:
        return pipe.caption(image)
    finally:
        MODEL_LOCK.release()


def caption_tab(pipe) -> None:
    st.caption("Image to text with the same model: upload a picture and MARS describes it.")
    upload = st.file_uploader("An image to caption", type=UPLOAD_TYPES, key="upload")
    if upload is None:
        return
    try:
        image = read_image(upload.getvalue(), upload.name)
        check_caption_image(image, upload.name)  # too small or blank: said now, not after a click
    except ValueError as error:
        st.error(str(error))
        return
    st.image(image, width=256, alt="uploaded image")
    if st.button("Caption it", key="caption_button"):
        try:
            with st.spinner("Captioning…"):
                st.session_state.caption = (upload.file_id, caption_image(pipe, image).strip())
        except Exception as error:  # one line in the page, never a traceback
            st.error(f"Captioning failed: {first_line(error)}")
    stored = st.session_state.caption
    if stored is not None and stored[0] == upload.file_id:
        st.success(stored[1] or "(the model wrote nothing)")


def page() -> None:
    st.set_page_config(page_title="MARS text-to-image", page_icon="🎨", layout="wide")
    init_session()
    st.markdown(IMAGE_CSS, unsafe_allow_html=True)
    st.title("MARS: text to image")
    refusal = network_refusal()
    if refusal is not None:
        st.error(refusal)
        st.stop()
    with st.sidebar:
        st.header("Model")
        checkpoint = model_picker()
    try:
        pipe = load_pipeline(resolve_checkpoint(checkpoint))
    except Exception as error:  # missing or broken bundle: say which and what to do
        st.error(f"Cannot load the model from {checkpoint!r}: {first_line(error).rstrip('.')}. "
                 f"Set the checkpoint directory in the sidebar (or ${CHECKPOINT_ENV}) to a bundle.")
        st.stop()
    with st.sidebar:
        size = f"{pipe.image_size} px" + (f", {2 * pipe.image_size} px with super-resolution" if pipe.superres else "")
        st.caption(f"Loaded: {size}")
        request = sampler_controls(pipe)
    collect_finished_job()
    generate, caption = st.tabs(["Generate", "Caption an uploaded image"])
    with generate:
        generate_tab(pipe, request)
    with caption:
        caption_tab(pipe)


try:
    page()
except Exception as error:  # the last guard: a one-line message in the page; the traceback goes to the log
    log.exception("MARS app error")
    st.error(f"Something went wrong: {first_line(error)}. Reload the page; the server log has the details.")
