"""The Prefect UI in a real browser, as a paged engineer uses it: headless Chromium (Debian's ``chromium``, driven
by ``playwright`` through ``executable_path``; ``make test`` installs it where missing) against a real
``prefect server start`` and ``fd-recovery serve`` running ``worker-crash-recovery`` on the sandbox cluster.

1. Deployments -> worker-crash-recovery -> Run -> Custom run: the form explains itself (human titles, units, the
   effective default of each setting-backed field, no "Property is type None"); a run name typed there is kept;
   a dry run started from it publishes its report, read in the run's Artifacts tab.
2. A real run over the approval threshold pauses; its Resume form (decision, name, reason) is filled in and
   submitted in the browser; the run acts once and its report, read in the browser, says who approved.

On failure a screenshot and the page's HTML are saved under ``$FD_TEST_ARTIFACTS/browser`` (default
``.test-artifacts/browser`` in the checkout). Skipped only where Chromium is missing and not in CI.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandbox.stack import settings_env
from tests.e2e.conftest import PROJECT_ROOT, Serve
from tests.e2e.test_work_pool import PrefectServer
from tests.integration import _recovery_fixtures as fx
from tests.integration._recovery_fixtures import ReplacementConsumer, deletions, seed_pending, worker_pods
from tests.polling import wait_for

CHROMIUM = os.environ.get("FD_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
DEPLOYMENT = "worker-crash-recovery"
ARTIFACTS = Path(os.environ.get("FD_TEST_ARTIFACTS") or PROJECT_ROOT / ".test-artifacts") / "browser"
BUDGET_S = 60.0  # the browser part, once the server and runner are up

if CHROMIUM is None and os.environ.get("CI"):
    raise RuntimeError("chromium is missing in CI: `make test` installs it (apt-get install chromium)")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' (playwright)")
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(240),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make test installs it: apt-get install chromium)"),
]
env = fx.env  # per-test settings: Redis keys, sandbox cluster, runs tables in PostgreSQL


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """``prefect server start`` (SQLite) serving the API and the UI on one free port."""
    server = PrefectServer(name="prefect-ui-server", home=tmp_path_factory.mktemp("ui-server"))
    yield server
    server.stop()


@pytest.fixture
def runner(env, ui_server, tmp_path) -> Iterator[Serve]:
    """``fd-recovery serve --only worker-crash-recovery`` against the UI's server, on this test's systems; a
    real run deleting even one pod waits for approval."""
    served = Serve("ui", env={**ui_server.env, **settings_env(env), "KUBECONFIG": env.kubeconfig or "",
                              "FD_APPROVAL_POD_DELETIONS": "0", "FD_APPROVAL_POLL_S": "0.5"},
                   log_dir=tmp_path, only=[DEPLOYMENT])
    try:
        wait_for(served.registered, timeout=90, interval=0.25, what="fd-recovery serve to register its deployment")
        yield served
    finally:
        served.stop()


@pytest.fixture
def page() -> Iterator:
    """A headless Chromium page (each test step saves it when it fails: ``step``)."""
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            tab = browser.new_page(viewport={"width": 1300, "height": 1100})
            tab.set_default_timeout(20_000)
            yield tab
        finally:
            browser.close()


def _save(tab, name: str) -> None:
    with contextlib.suppress(Exception):
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        stem = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}-{time.strftime('%Y%m%dT%H%M%S')}"
        tab.screenshot(path=f"{stem}.png", full_page=True)
        Path(f"{stem}.html").write_text(tab.content())
        print(f"browser test artifacts: {stem}.png, {stem}.html")


@contextlib.contextmanager
def step(tab, name: str) -> Iterator[None]:
    """A named step: a failure inside saves the page as it was (screenshot + HTML) under that name."""
    try:
        yield
    except BaseException:
        _save(tab, name)
        raise


def field(tab, title: str):
    """The input of the form field titled ``title`` (Prefect appends " (Optional)" to optional ones)."""
    prop = tab.locator(".schema-form-property").filter(
        has=tab.get_by_text(re.compile(rf"^{re.escape(title)}( \(Optional\))?$"), exact=True)).last
    return prop.locator("textarea, input").first


def open_report(tab, ui: str, run_id, key: str) -> str:
    """The run's page -> Artifacts tab -> the artifact card ``key`` -> its rendered markdown."""
    tab.goto(f"{ui}/runs/flow-run/{run_id}")
    tab.get_by_text("Artifacts", exact=True).first.click()
    title = tab.locator(".artifact-card__title").filter(has_text=re.compile(rf"^{re.escape(key)}$"))
    tab.locator(".artifact-card").filter(has=title).first.click()
    tab.wait_for_url("**/artifacts/artifact/**")
    body = tab.locator(".markdown-renderer").filter(has_text="Outcome:").first
    body.wait_for()
    return body.inner_text()


def final_run(server: PrefectServer, name: str, *, timeout: float = 40.0):
    """The flow run named ``name`` once it reached a final state."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    def done():
        with server.client() as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        return runs[0] if runs and runs[0].state and runs[0].state.is_final() else None

    return wait_for(done, timeout=timeout, interval=0.25, what=f"flow run {name!r} to finish")


def paused(server: PrefectServer, run_id) -> bool:
    with server.client() as client:
        state = client.read_flow_run(run_id).state
    return state is not None and state.is_paused()


def test_an_engineer_runs_and_approves_a_crash_recovery_in_the_prefect_ui(env, cluster, redis, ui_server, runner,
                                                                          page):
    s, ui, tab = env, ui_server.api_url.removesuffix("/api"), page
    a, *_ = worker_pods(cluster, s)
    seed_pending(redis, s, consumer=s.consumer_for_pod(a), n=2, tag=f"ui{uuid.uuid4().hex[:4]}")
    cluster.crash_loop(a, exit_code=1, reason="Error", logs=["Traceback (most recent call last):", "KeyError: 'x'"])
    wait_for(lambda: a not in worker_pods(cluster, s), what=f"{a} not Ready")
    t0 = time.monotonic()

    with step(tab, "1-custom-run-form"):
        tab.goto(f"{ui}/deployments")
        tab.get_by_role("link", name=DEPLOYMENT, exact=True).first.click()
        tab.get_by_role("button", name="Run", exact=True).click()
        tab.get_by_role("button", name="Custom run").click()
        tab.wait_for_url("**/run?**")
        field(tab, "Crashed pod").wait_for()
        form = tab.locator("form").first.inner_text()
        for text in ("Crashed pod (Optional)", "Dry run (Optional)", "Replacement timeout (s) (Optional)",
                     "Dead-letter after (deliveries)", f"Default: FD_REPLACEMENT_TIMEOUT_S = {s.replacement_timeout_s:g} s.",
                     f"Default: FD_POISON_MIN_DELIVERIES = {s.poison_min_deliveries} deliveries."):
            assert text in form, text
        assert "Property is type" not in form and "replacement_timeout_s" not in form
        assert field(tab, "Replacement timeout (s)").input_value() == f"{s.replacement_timeout_s:g}"
        typed = f"Browser drill {uuid.uuid4().hex[:6]}"
        tab.locator(".flow-run-name-input input").fill(typed)
        field(tab, "Crashed pod").fill(a)
        tab.get_by_role("button", name="Submit").click()
        tab.get_by_text(f"{typed} scheduled to start now").first.wait_for()

    with step(tab, "2-dry-run-report"):
        dry = final_run(ui_server, typed)  # found by the name typed in the form: kept, not replaced
        assert dry.state.is_completed() and dry.parameters["pod"] == a and dry.parameters["dry_run"] is True
        md = open_report(tab, ui, dry.id, DEPLOYMENT)
        assert "Outcome: dry_run" in md and a in md
        assert "A real run would wait for a person's approval first: delete 1 worker pod" in md
        assert deletions(cluster) == []

    with step(tab, "3-approve-in-the-resume-form"), \
            ReplacementConsumer(cluster, s, known=worker_pods(cluster, s, ready_only=False)):
        with ui_server.client() as client:
            deployment = client.read_deployment_by_name(f"{DEPLOYMENT}/{DEPLOYMENT}")
            real = client.create_flow_run_from_deployment(
                deployment.id, name=f"Paged at 3am {uuid.uuid4().hex[:6]}",
                parameters={"pod": a, "dry_run": False, "verify_consuming_s": 15})
        wait_for(lambda: paused(ui_server, real.id), timeout=30, interval=0.25, what="the run to pause for approval")
        assert deletions(cluster) == []  # waiting for a person: nothing done yet
        tab.goto(f"{ui}/runs/flow-run/{real.id}")
        tab.get_by_role("button", name="Resume").click()
        dialog = tab.get_by_role("dialog")
        dialog.get_by_text("delete 1 worker pod: " + a).first.wait_for(timeout=20_000)  # the plan, rendered async
        dialog.locator(".p-select-button__control").focus()
        tab.keyboard.press("ArrowDown")  # opens the decision's options
        tab.locator(".p-select-option", has_text="approve").first.click()
        areas = dialog.locator("textarea")
        areas.nth(0).fill("Dana on call")
        areas.nth(1).fill("one crash-looping pod, checked the logs")
        dialog.get_by_role("button", name="Submit").click()
        done = final_run(ui_server, real.name, timeout=45)

    with step(tab, "4-approved-report"):
        assert done.state.is_completed(), done.state
        md = open_report(tab, ui, done.id, DEPLOYMENT)
        assert "Outcome: recovered" in md and "Approved by Dana on call: one crash-looping pod, checked the logs" in md
        assert deletions(cluster) == [a]  # acted once
        assert time.monotonic() - t0 < BUDGET_S, f"the browser part took {time.monotonic() - t0:.0f} s"
