"""The SAE latent dashboard (`intervene features report`): written from a real cache of the demo model, then
opened in a real headless Chromium: every page renders without console errors or network requests, and a
screenshot of each is taken."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from intervene.assets import DEMO_MODEL_DIR
from intervene.features.sae import DEMO_SAE_DIR
from tests.browser import browser, visit

pytestmark = pytest.mark.skipif(not (DEMO_MODEL_DIR / "model.safetensors").is_file()
                                or not (DEMO_SAE_DIR / "cfg.json").is_file(), reason="demo model / SAE not built")


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[int]]:
    """A 2048-token cache of the demo model's SAE, two latents with an explanation and scores, and the pages
    the CLI writes for the eight most frequent latents (with logit effects)."""
    from intervene.cli import main
    from intervene.features import LatentCache

    root = tmp_path_factory.mktemp("dash")
    cache = root / "cache"
    assert main(["features", "cache", "demo", "demo", "--tokens", "2048", "--out", str(cache), "--quiet"]) == 0
    count = LatentCache(cache).stats["count"]
    latents = count.argsort(descending=True, stable=True)[:8].tolist()
    for i, scorer in ((latents[0], "detection"), (latents[1], "fuzzing")):  # as `features explain/score` write them
        (root / "auto" / "explanations").mkdir(parents=True, exist_ok=True)
        (root / "auto" / "explanations" / f"{i}.json").write_text(json.dumps({"latent": i, "explanation": "<b>x</b> & y"}))
        (root / "auto" / "scores" / scorer).mkdir(parents=True, exist_ok=True)
        (root / "auto" / "scores" / scorer / f"{i}.json").write_text(json.dumps({"metrics": {"balanced_accuracy": 0.75}}))
    assert main(["features", "report", str(cache), "--out", str(root / "html"), "--explanations", str(root / "auto"),
                 "--max-latents", "8", "--no-progress"]) == 0
    return root / "html", latents


def test_the_pages_hold_what_a_reader_needs(dashboard: tuple[Path, list[int]]) -> None:
    html, latents = dashboard
    index = (html / "index.html").read_text()
    assert all(f'href="latents/{i}.html"' in index for i in latents)
    assert "&lt;b&gt;x&lt;/b&gt; &amp; y" in index and "<b>x</b>" not in index  # explanations are escaped
    assert "detection score" in index and "fuzzing score" in index
    page = (html / "latents" / f"{latents[0]}.html").read_text()
    assert "Strongest contexts" in page and "Across the activation range" in page
    assert "Logit effects of the decoder direction" in page and "rgba(255, 140, 0" in page
    for text in [index, page]:
        assert "http://" not in text and "https://" not in text  # self-contained: nothing to fetch


def test_every_page_renders_in_a_real_browser(dashboard: tuple[Path, list[int]], tmp_path: Path) -> None:
    html, latents = dashboard
    pages = [html / "index.html"] + [html / "latents" / f"{i}.html" for i in latents]

    def sort_by_latent(page) -> None:  # the sortable table works: click "latent" twice, ascending then descending
        page.click("th:has-text('latent')")
        first = page.inner_text("tbody tr:first-child td:first-child")
        page.click("th:has-text('latent')")
        last = page.inner_text("tbody tr:first-child td:first-child")
        assert int(first) == min(latents) and int(last) == max(latents)

    with browser() as b:
        for path in pages:
            shot = tmp_path / f"{path.stem}.png"
            v = visit(b, path, shot, action=sort_by_latent if path.name == "index.html" else None)
            assert not v.errors, (path, v.errors)
            assert not v.requests, (path, v.requests)
            assert v.title in ("SAE latents", f"Latent {path.stem}")
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
