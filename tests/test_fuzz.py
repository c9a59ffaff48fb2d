"""Adversarial fuzzing: every route of ``tunesmith serve`` and of ``tunesmith ui``, from the app's own
OpenAPI schema (schemathesis), against a live server on the tiny model bound to 127.0.0.1.

For each operation schemathesis draws requests that fit the schema (positive) and requests that
break it (negative: wrong types, missing fields, values out of range), sent with an admin key so
that every route runs past its key check. Random strings would seldom name anything the server
knows, so half the draws are steered (``steer``): a request that fits the schema, rid of the random
extra fields the schema allows, whose ``model``, ``lora_name``, run ``name``, completion ``id``, rate
``item`` and the like are ones the server knows; those requests reach the engine, the adapter pool,
the store and the launch checks. No answer may be a 500, and the server must still
answer afterwards.

The draws are fixed (``derandomize``: the same examples on every run, drawn from the schema alone)
and bounded: ``MAX_EXAMPLES`` a mode and operation, ``REQUEST_TIMEOUT_S`` a request, no shrinking
(a failure is reported as drawn, every one of them, not only the first). The launch routes run
their checks in full, but ``launch.start`` is replaced: nothing is ever started. What the fuzzing
found is at the end of this file, each failing example a named test.
"""

from __future__ import annotations

import re
import time

import httpx
import pytest
import torch
from test_serve import make_run

from tunesmith.serve.access import Access
from tunesmith.serve.engine import Sampling, next_token
from tunesmith.serve.options import ServeOptions
from tunesmith.serve.server import build_server

MAX_EXAMPLES = 25  # a mode (positive, negative) and operation
REQUEST_TIMEOUT_S = 20
DERANDOMIZE = True  # the same draws every run
BUDGET_S = 120  # each app's whole run; about 20 s on the 2-core development machine
ADMIN = "fuzz-admin-key"
UI_ONLY = "/ui/"  # the UI's app is the server's plus these; the server's own are fuzzed on `serve`


@pytest.fixture(scope="module")
def runs_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-runs")
    make_run(root, tiny_model_dir, "alpha", seed=1)
    make_run(root, tiny_model_dir, "beta", seed=2)
    return root


def options() -> ServeOptions:
    return ServeOptions(max_prompt_tokens=64, max_tokens=16, default_max_tokens=8, max_batch=4,
                        batch_window_ms=5, max_body_bytes=20_000)


@pytest.fixture(scope="module")
def serve(runs_dir, tmp_path_factory):
    store = tmp_path_factory.mktemp("fuzz-store") / "store.sqlite"
    server = build_server({"alpha": runs_dir / "alpha", "beta": runs_dir / "beta"}, adapter_dirs=[runs_dir],
                          aliases={"prod": "alpha"}, options=options(), access=Access({ADMIN: "admin"}), store=store)
    app = server.asgi()
    with server.in_thread() as url:
        yield app, url


@pytest.fixture(scope="module")
def ui(runs_dir, tmp_path_factory):
    from tunesmith.ui import launch
    from tunesmith.ui.app import UiContext, build_ui_server

    root = tmp_path_factory.mktemp("fuzz-ui")
    (root / "examples").mkdir()
    (root / "examples" / "tiny.yaml").write_text((runs_dir / "alpha" / "config.yaml").read_text())
    ctx = UiContext(runs_dir=runs_dir, store_path=root / "store.sqlite", examples_dir=root / "examples",
                    prompts=["a fine film", "a dull plot"])
    server = build_ui_server(ctx, {"alpha": runs_dir / "alpha"}, options=options(), access=Access({ADMIN: "admin"}))
    app = server.asgi()
    with pytest.MonkeyPatch.context() as patch, server.in_thread() as url:
        patch.setattr(launch, "start", lambda ctx, name, run_dir, args: {"name": name, "pid": 0, "command": args})
        yield app, url


def known_values(runs_dir, served: list[str], seen: dict[str, list]) -> dict[str, list]:
    """For each body field or query parameter: values the server knows. ``seen`` fills as answers
    come back (completion ids for ``/v1/feedback``, rate items for the verdicts)."""
    return {"model": served + ["prod"], "models": [served[:1], served[:2], served[:1] * 2],
            "prompt": ["honestly the film is", "a"], "max_tokens": [1, 4, 16],
            "messages": [[{"role": "user", "content": "honestly the film is"}],
                         [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"}]],
            "lora_name": ["alpha", "beta", "gamma"], "alias": ["prod", "stable"],
            "lora_path": [str(runs_dir / "alpha"), str(runs_dir / "beta"), str(runs_dir)],
            "name": ["alpha", "beta", "fuzz-new", "sub/fuzz-new"], "names": ["alpha", "alpha,beta"],
            "source": ["tiny.yaml", "run:alpha", "nope.yaml"],
            "edits": [[], ["train.max_steps=2"], ["output.dir=elsewhere"], ["method.r=0"]],
            "id": seen["id"], "item": seen["item"]}


def steer(case, known: dict[str, list], draw) -> None:
    """Replace the fields of ``case`` (body and query) that ``known`` has values for, by drawn ones;
    drop the random extra fields a schema with ``additionalProperties`` lets through (a field name
    of random characters), which the server refuses before anything else."""
    from hypothesis import strategies as st

    for part in (case.body, case.query):
        if isinstance(part, dict):
            for field in list(part):
                if not re.fullmatch(r"[a-z_]+", field):
                    del part[field]
                elif known.get(field):
                    part[field] = draw(st.sampled_from(known[field]))


def remember(response, seen: dict[str, list]) -> None:
    try:
        answer = response.json()
    except ValueError:
        return
    if isinstance(answer, dict):
        for field in ("id", "item"):
            if isinstance(answer.get(field), str) and answer[field] not in seen[field]:
                seen[field].append(answer[field])


def fuzz(app, url: str, known: dict[str, list], seen: dict[str, list], keep) -> tuple[list[str], list[str]]:
    """Fuzz every operation of ``app``'s OpenAPI schema whose path ``keep`` accepts, against ``url``:
    the operations fuzzed, and a line for each failing example."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.generation.modes import GenerationMode

    schema = schemathesis.openapi.from_dict(app.openapi())
    fuzzed, failures = [], []
    for result in schema.get_all_operations():
        operation = result.ok()
        if not keep(operation.path):
            continue
        fuzzed.append(operation.label)
        positive = operation.as_strategy(GenerationMode.POSITIVE)
        anything = st.one_of(positive, operation.as_strategy(GenerationMode.NEGATIVE))

        @settings(max_examples=2 * MAX_EXAMPLES, derandomize=DERANDOMIZE, database=None, deadline=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(data=st.data())
        def check(data):
            steered = data.draw(st.booleans())
            case = data.draw(positive if steered else anything)
            if steered:
                steer(case, known, data.draw)
            try:
                response = case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"},
                                                  checks=[not_a_server_error], timeout=REQUEST_TIMEOUT_S)
                remember(response, seen)
            except (Exception, FailureGroup) as err:  # every failing example, not the first alone
                failures.append(f"{operation.label}: {type(err).__name__}: {str(err)[:2000]}")

        check()
    return fuzzed, failures


def still_up(url: str) -> None:
    health = httpx.get(url + "/health", timeout=10)
    assert health.status_code == 200, health.text


def test_fuzz_every_route_of_serve(serve, runs_dir):
    app, url = serve
    started = time.monotonic()
    seen = {"id": [], "item": []}
    fuzzed, failures = fuzz(app, url, known_values(runs_dir, ["alpha", "beta"], seen), seen, keep=lambda path: True)
    assert len(fuzzed) == 10, fuzzed  # the schema's every route: health, models, the two inference routes, score, stats, four others
    assert not failures, "\n\n".join(failures)
    assert seen["id"], "no request was answered by the engine: the steering no longer reaches it"
    still_up(url)
    assert time.monotonic() - started < BUDGET_S


def test_fuzz_every_route_of_the_ui(ui, runs_dir):
    app, url = ui
    started = time.monotonic()
    seen = {"id": [], "item": []}
    fuzzed, failures = fuzz(app, url, known_values(runs_dir, ["alpha"], seen), seen,
                            keep=lambda path: path.startswith(UI_ONLY))
    assert len(fuzzed) == 16, fuzzed  # the UI's JSON API; its pages and files are not in the schema
    assert not failures, "\n\n".join(failures)
    assert seen["item"], "no rate item was issued: the steering no longer reaches the rate page's models"
    still_up(url)
    assert time.monotonic() - started < BUDGET_S


# What the fuzzing found: each failing example as it was drawn, a 500 before its fix.
def test_a_top_p_below_float32s_least_number_samples_the_most_likely_token(serve):
    """``"top_p": 5e-324`` passed the edge (it is over 0) and is 0 in float32, so the nucleus kept no
    token: 500 "invalid multinomial distribution (sum of probabilities <= 0)"."""
    logits = torch.tensor([0.1, 2.0, -1.0])
    assert next_token(logits, Sampling(1, temperature=1.0, top_p=5e-324), torch.Generator().manual_seed(0)) == 1
    base = httpx.get(serve[1] + "/health").json()["model"]  # the fuzzing may have unloaded the adapters
    out = httpx.post(serve[1] + "/v1/chat/completions", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30,
                     json={"messages": [{"role": "developer", "content": "code"}], "model": base, "top_p": 5e-324})
    assert out.status_code == 200, out.text


def test_a_lora_path_under_an_unknown_home_is_400(serve):
    """``"lora_path": "~á"``: expanding the home of a user that does not exist raised RuntimeError."""
    for path in ("~\u00e1", "a\x00b"):
        out = httpx.post(serve[1] + "/v1/load_lora_adapter", headers={"Authorization": f"Bearer {ADMIN}"},
                         json={"lora_name": "x", "lora_path": path}, timeout=30)
        assert out.status_code == 400 and "lora_path" in out.json()["error"]["message"], out.text


def test_a_run_name_no_file_system_can_hold_is_404(ui):
    """A NUL byte (``/ui/api/run/metrics?name=畘%00``) raised ValueError, and a name over 255 bytes
    OSError "File name too long", in every route that reads a run by name."""
    url, key = ui[1], {"Authorization": f"Bearer {ADMIN}"}
    for name in ("\u7558\x00", "T\u0335" * 200):
        for route, query in (("/ui/api/run", "name"), ("/ui/api/run/metrics", "name"), ("/ui/api/compare", "names")):
            out = httpx.get(url + route, params={query: name}, headers=key, timeout=30)
            assert out.status_code == 404, (route, out.text)
        for route in ("/ui/api/launch/stop", "/ui/api/launch/resume"):
            out = httpx.post(url + route, json={"name": name}, headers=key, timeout=30)
            assert out.status_code == 404, (route, out.text)


def test_a_launch_edit_whose_value_is_not_yaml_is_400_at_that_edit(ui):
    """``"edits": ["output.dir=[unclosed"]`` (and a NUL byte in a value) raised the YAML parser's error."""
    url, key = ui[1], {"Authorization": f"Bearer {ADMIN}"}
    for edit in ("output.dir=[unclosed", "train.lr=a\x00b"):
        out = httpx.post(url + "/ui/api/launch", json={"source": "tiny.yaml", "name": "fuzz-new",
                                                       "edits": ["train.max_steps=2", edit]}, headers=key, timeout=30)
        assert out.status_code == 400, out.text
        assert out.json()["error"]["problems"][0]["field"] == 1  # placed at the edit, as the page shows it


def test_fastapis_own_errors_have_the_openai_shape(serve):
    """An unknown path, or a body that nests too deep for the JSON parser, answered ``{"detail": ...}``
    (not a 500, but no client reads that shape)."""
    url = serve[1]
    unknown = httpx.get(url + "/v1/nope", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    deep = '{"model": "alpha", "prompt": "x", "stop": ' + "[" * 5000 + "]" * 5000 + "}"
    out = httpx.post(url + "/v1/completions", content=deep, timeout=30,
                     headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})
    assert out.status_code == 400 and "error" in out.json(), out.text
