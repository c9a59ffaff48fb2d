"""Fixtures of the web UI's tests: a runs directory with two tiny trained LoRA runs, the UI's server on
127.0.0.1, and a headless Debian chromium driven by Playwright (never a downloaded browser).

Browser tests skip, with the reason in the summary, where ``chromium`` is not installed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import review_rows, write_config, write_jsonl

SKIP_REASON = "chromium not installed (apt-get install chromium): browser tests skipped"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
_browser_state: dict[str, str] = {}  # "ran" or "skipped" -> why, for the terminal summary


@dataclass
class UiEnv:
    runs_dir: Path
    model_dir: Path
    examples_dir: Path
    store_path: Path
    runs: dict[str, Path]  # the finished runs, by name


def tiny_config(path: Path, model_dir: Path, data: Path, out: Path, steps: int = 4, lr: float = 0.05) -> Path:
    """A LoRA config that trains the tiny model for ``steps`` steps on tiny reviews, in seconds."""
    return write_config(path, model_dir,
                        {"path": str(data), "format": "classification",
                         "columns": {"text": "review", "label": "sentiment"}, "max_length": 48,
                         "split": {"validation": 0.2, "test": 0.2}},
                        train={"max_steps": steps, "eval_every": 2, "save_every": 2, "lr": lr, "eval_max_examples": 8},
                        eval={"samples": 1, "max_new_tokens": 4, "max_examples": 8},
                        output={"dir": str(out)})


@pytest.fixture(scope="session")
def ui_env(tmp_path_factory, tiny_model_dir) -> UiEnv:
    """A runs directory with a tiny base model and two finished tiny LoRA runs (the second continues the
    first), and an examples directory holding a tiny config to launch."""
    from tunesmith.config import load_config
    from tunesmith.recipe import run_training

    root = tmp_path_factory.mktemp("ui")
    model_dir = tiny_model_dir
    data = write_jsonl(root / "reviews.jsonl", review_rows(60))
    runs_dir, examples = root / "runs", root / "examples"
    runs_dir.mkdir()
    examples.mkdir()
    runs = {}
    for name, lr, parent in (("alpha", 0.05, None), ("beta", 0.02, "alpha")):
        config = tiny_config(root / f"{name}.yaml", model_dir, data, runs_dir / name, lr=lr)
        run_training(load_config(config), parent=runs.get(parent))
        runs[name] = runs_dir / name
    tiny_config(examples / "tiny_lora.yaml", model_dir, data, runs_dir / "tiny")
    return UiEnv(runs_dir, model_dir, examples, runs_dir / "store.sqlite", runs)


class UiServer:
    """The UI's server running on a thread: ``url``, ``runs_dir``, ``store_path``; ``keys(...)`` turns
    on API keys for a block."""

    def __init__(self, url: str, ctx, server):
        self.url, self.ctx, self.server = url, ctx, server
        self.runs_dir, self.store_path = ctx.runs_dir, ctx.store_path

    @contextlib.contextmanager
    def keys(self, admin: dict[str, str] | None = None, rater: dict[str, str] | None = None,
             user: dict[str, str] | None = None):
        """Within the block, only these keys (key -> key id) are accepted, as with --api-key-file,
        --rater-key-file and --user-key-file; the server is open again afterwards."""
        access = self.server.access  # the app holds this object: changes apply to the next request
        access.admin_keys.update(admin or {})
        access.rater_keys.update(rater or {})
        access.user_keys.update(user or {})
        try:
            yield self
        finally:
            access.admin_keys.clear()
            access.rater_keys.clear()
            access.user_keys.clear()


@pytest.fixture(scope="session")
def ui_server(ui_env):
    from tunesmith.serve.options import ServeOptions
    from tunesmith.ui.app import UiContext, build_ui_server

    ctx = UiContext(runs_dir=ui_env.runs_dir, store_path=ui_env.store_path, examples_dir=ui_env.examples_dir)
    server = build_ui_server(ctx, {}, options=ServeOptions(max_tokens=32, default_max_tokens=16, batch_window_ms=5))
    with server.in_thread() as url:
        yield UiServer(url, ctx, server)
    for process in ctx.processes.values():  # a launched run still going: stop it (it checkpoints)
        if process.poll() is None:
            process.terminate()
            process.wait(30)


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        _browser_state["skipped"] = SKIP_REASON
        pytest.skip(SKIP_REASON)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _browser_state["skipped"] = "the playwright package is not installed (pip install -e '.[test]')"
        pytest.skip(_browser_state["skipped"])
    _browser_state["ran"] = path
    return path


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, headless=True,
                                             args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def _page(browser, viewport):
    context = browser.new_context(viewport=viewport, device_scale_factor=1)
    context.set_default_timeout(20_000)
    page = context.new_page()
    return context, page


@pytest.fixture
def page(browser):
    """A laptop-sized page (1280x800)."""
    context, page = _page(browser, LAPTOP)
    yield page
    context.close()


@pytest.fixture
def phone_page(browser):
    """A phone-sized page (390x844)."""
    context, page = _page(browser, PHONE)
    yield page
    context.close()


@pytest.fixture(scope="session")
def shot():
    """``shot(page, name)``: a PNG of the page's viewport as NAME-laptop.png or NAME-phone.png, into
    $TUNESMITH_UI_SHOTS (docs/ui, to refresh the docs' screenshots) or a temporary folder."""
    out = Path(os.environ.get("TUNESMITH_UI_SHOTS") or tempfile.mkdtemp(prefix="ui-shots-"))
    out.mkdir(parents=True, exist_ok=True)

    def take(page, name: str) -> Path:
        width = page.viewport_size["width"]
        path = out / f"{name}-{'phone' if width < 700 else 'laptop'}.png"
        page.screenshot(path=str(path))
        return path

    return take


def pytest_terminal_summary(terminalreporter):
    if "ran" in _browser_state:
        terminalreporter.write_line(f"browser tests (tests/ui): ran on {_browser_state['ran']}")
    elif "skipped" in _browser_state:
        terminalreporter.write_line(f"browser tests (tests/ui): SKIPPED: {_browser_state['skipped']}", yellow=True)

