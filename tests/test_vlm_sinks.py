"""Sink diagnostics of vision-language traces (issue 22 item 3): ``trace.diagnostics()`` reports the
off-image shares, the visual sink tokens with their boxes on the photo and the weight by grid row, against
traces built here with a sink and a row bias placed by hand (every expected number written out or computed
here by loops over the raw arrays); the one line in the figures and the explorer; a tiny real VLM's shares."""

from __future__ import annotations

import numpy as np
import pytest

import attnlab
from attnlab.diagnostics import Diagnostics
from attnlab.errors import AttnlabError
from attnlab.keys import View
from attnlab.sinks import SINK_FACTOR, SINK_WORDS, VisionDiagnostics
from attnlab.trace import CaptionTrace

pytestmark = pytest.mark.usefixtures("one_thread")
L, H, T = 2, 2, 8
PHOTO = (40, 60)  # (height, width)
VIEWS = [View("base", (3, 3), (0.0, 0.0, 60.0, 40.0)), View("tiles", (4, 6), (-6.0, 0.0, 66.0, 40.0))]
SINK = (1, 4)  # tiles cell, a sink for words 0..5 of head 0 in the last layer
SINK_BOX = (42.0, 10.0, 54.0, 20.0)  # tiles box x from -6 in columns of 72 / 6 = 12 px, rows of 40 / 4 = 10 px
ROW_BIAS = np.array([1.0, 1.5, 2.0, 4.0])  # tiles rows: the last row (nearest the text) favoured


def placed(seed: int = 0) -> tuple[CaptionTrace, list[np.ndarray], dict[str, np.ndarray]]:
    """A two-view trace: every word's content peak at its own cell (moving), a row bias on the tiles, and in
    the last layer's head 0 a sink at tiles ``SINK`` holding 30% of the row for words 0..5 (not 6, 7); a
    decoy cell (base (2, 2)) high for 3 words of 8 only. Image 75%, prompt 15%, special 7%, newline 3%."""
    rng = np.random.default_rng(seed)
    base = rng.random((L, H, T, 3, 3)) * 0.2
    tiles = rng.random((L, H, T, 4, 6)) * 0.2 * ROW_BIAS[:, None]
    for t in range(T):  # the word's own object: a different tiles cell per word
        tiles[:, :, t, t % 4, (t * 5) % 6 if (t % 4, (t * 5) % 6) != SINK else 0] += 1.0
    base[:, :, :3, 2, 2] += 2.0  # decoy: high for 3 of 8 words (fewer than half)
    total = base.sum((-2, -1)) + tiles.sum((-2, -1))  # (L, H, T)
    base, tiles = base / total[..., None, None] * 0.75, tiles / total[..., None, None] * 0.75
    sink = np.zeros(T)
    sink[:6] = 0.3
    scale = (0.75 - sink) / 0.75  # the sink's 30% taken from the other image tokens: the image keeps 75%
    base[1, 0] *= scale[:, None, None]
    tiles[1, 0] *= scale[:, None, None]
    tiles[1, 0, :, SINK[0], SINK[1]] += sink
    shares = {"prompt": np.full((L, H, T), 0.15), "special": np.full((L, H, T), 0.07), "newline": np.full((L, H, T), 0.03)}
    photo = np.full((*PHOTO, 3), 100, np.uint8)
    maps = [base, tiles]
    trace = CaptionTrace.from_views([f"w{t}" for t in range(T)], np.arange(T), VIEWS, maps, photo, key_shares=shares)
    return trace, maps, shares


def reference_sinks(maps: list[np.ndarray], layer: int, head: int | None) -> dict[tuple[int, int, int], float]:
    """(view, row, col) -> fraction of words above k x uniform, by loops over every token (kept when >= half)."""
    pick = [m[layer].mean(0) if head is None else m[layer, head] for m in maps]  # (steps, h, w) each
    n = sum(p.shape[1] * p.shape[2] for p in pick)
    steps = pick[0].shape[0]
    out = {}
    for v, p in enumerate(pick):
        for r in range(p.shape[1]):
            for c in range(p.shape[2]):
                above = 0
                for t in range(steps):
                    image = sum(q[t].sum() for q in pick)
                    above += p[t, r, c] > SINK_FACTOR * image / n
                if above / steps >= SINK_WORDS:
                    out[(v, r, c)] = above / steps
    return out


def test_the_placed_sink_is_found_with_its_box_share_and_words():
    trace, maps, _ = placed()
    d = trace.diagnostics(layer=-1, head=0)
    assert isinstance(d, VisionDiagnostics)
    assert [(s.view, s.view_index, s.row, s.col) for s in d.sinks] == [("tiles", 1, *SINK)]
    sink = d.sinks[0]
    assert sink.box == pytest.approx(SINK_BOX)
    assert sink.words == pytest.approx(6 / 8)
    assert sink.share == pytest.approx(np.mean([maps[1][1, 0, t, 1, 4] for t in range(T)]))
    np.testing.assert_allclose(d.sink_share, maps[1][1, 0, :, 1, 4])
    assert reference_sinks(maps, 1, 0) == {(1, *SINK): 6 / 8}
    assert d.line() == f"sink: 1 token takes {np.mean(maps[1][1, 0, :, 1, 4]):.0%} for 75% of words"
    assert 0.225 < sink.share < 0.235  # 0.3 for 6 words of 8 = 22.5%, plus the cell's own noise
    assert d.line() == "sink: 1 token takes 23% for 75% of words"
    # head 1 and the first layer have no sink; the decoy (3 words of 8) never passes
    for layer, head in [(-1, 1), (0, 0), (0, "mean")]:
        other = trace.diagnostics(layer=layer, head=head)
        assert other.sinks == () and other.line() == "no sink tokens"
        assert reference_sinks(maps, layer % L, None if head == "mean" else head) == {}
    mean = trace.diagnostics()  # the last layer, mean of heads: the sink at half strength still passes
    assert (mean.layer, mean.head) == (1, "mean")
    assert {(s.view_index, s.row, s.col): s.words for s in mean.sinks} == reference_sinks(maps, 1, None)
    assert mean.line(3, 1, 1) == "no sink tokens" and mean.line(3, 1, 0) == d.line()  # the explorer's call


def test_off_image_shares_per_word_and_over_the_caption():
    trace, maps, shares = placed()
    for layer, head in [(1, 0), (0, "mean")]:
        d = trace.diagnostics(layer, head)
        pick = (lambda a: a[layer].mean(0)) if head == "mean" else (lambda a: a[layer, head])  # noqa: E731
        for kind in ("prompt", "special", "newline"):
            np.testing.assert_allclose(d.shares[kind], pick(shares[kind]), atol=1e-6)
        for v, m in zip(VIEWS, maps):
            np.testing.assert_allclose(d.view_shares[v.name], [pick(m)[t].sum() for t in range(T)], atol=1e-6)
        np.testing.assert_allclose(d.image, 0.75, atol=1e-6)
        c = d.caption_shares
        assert c["image"] == pytest.approx(0.75, abs=1e-6) and c["prompt"] == pytest.approx(0.15, abs=1e-6)
        assert c["special"] == pytest.approx(0.07, abs=1e-6) and c["newline"] == pytest.approx(0.03, abs=1e-6)
        assert sum(c.values()) == pytest.approx(1.0, abs=1e-5) and list(c) == ["image", "prompt", "special", "newline"]
        views = d.caption_view_shares
        assert views["base"] == pytest.approx(np.mean([pick(maps[0])[t].sum() for t in range(T)]), abs=1e-6)
        assert views["base"] + views["tiles"] == pytest.approx(0.75, abs=1e-6)


def test_too_few_words_have_no_sinks_and_the_line_says_why():
    trace, maps, shares = placed()
    short = CaptionTrace.from_views(["w0", "w1"], [0, 1], VIEWS, [m[:, :, :2] for m in maps], trace.image,
                                    key_shares={k: v[:, :, :2] for k, v in shares.items()})
    d = short.diagnostics(-1, 0)  # the placed sink holds 30% for both words: two words cannot tell it from content
    assert d.sinks == () and d.line() == "sink: n/a (fewer than 3 words)"


def test_weight_by_grid_row_shows_the_placed_row_bias():
    trace, maps, _ = placed()
    d = trace.diagnostics(0, "mean")  # the first layer: no sink, the row bias alone
    for v, m in zip(VIEWS, maps):
        want = [np.mean([m[0, :, t, r, :].sum() / H for t in range(T)]) for r in range(v.grid[0])]
        np.testing.assert_allclose(d.row_weights[v.name], want, atol=1e-6)
        assert d.row_ratio[v.name] == pytest.approx(want[-1] / want[0], rel=1e-5)
    assert d.row_ratio["tiles"] > 2.0  # the noise grows 4x from the first row to the last, and row 3 holds 2 peaks
    assert np.argmax(d.row_weights["tiles"]) == 3


def test_single_view_traces_keep_their_diagnostics_and_a_prompted_one_gets_the_vision_report():
    rng = np.random.default_rng(2)
    rows = rng.dirichlet(np.ones(7), size=(1, 2, 4))  # (layers, heads, steps, 1 prefix + 2 x 3)
    catr = CaptionTrace.from_attention(list("abcd"), [1, 2, 3, 4], rows, (2, 3), np.zeros((30, 45, 3), np.uint8), prefix_tokens=1)
    assert isinstance(catr.diagnostics(), Diagnostics)
    with pytest.raises(AttnlabError, match="choose them in .line") as err:
        catr.diagnostics(layer=0)
    assert "\n" not in str(err.value)
    one = rng.dirichlet(np.ones(10), size=(1, 2, 4))  # 2 x 3 image tokens, then 4 prompt keys
    prompted = CaptionTrace.from_views(list("abcd"), [1, 2, 3, 4], [View("image", (2, 3), (0, 0, 45, 30))],
                                       [one[..., :6].reshape(1, 2, 4, 2, 3)], np.zeros((30, 45, 3), np.uint8),
                                       key_shares={"prompt": one[..., 6:].sum(-1)})
    d = prompted.diagnostics()
    assert isinstance(d, VisionDiagnostics)
    np.testing.assert_allclose(d.shares["prompt"], one[0, :, :, 6:].sum(-1).mean(0), atol=1e-6)
    with pytest.raises(AttnlabError, match="head 5 does not exist"):
        prompted.diagnostics(head=5)


def _texts_overlap(fig, needle: str):
    """The text artist holding ``needle`` as one of its lines, and whether it lies inside the canvas and off
    every other visible text."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # a figure pyplot does not manage has no renderer of its own
    canvas.draw()
    renderer = canvas.get_renderer()
    from matplotlib.text import Text

    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    holder = [t for t in texts if needle in t.get_text().split("\n")]
    assert len(holder) == 1, [t.get_text() for t in texts]
    box = holder[0].get_window_extent(renderer)
    page = fig.bbox
    inside = box.x0 >= page.x0 - 0.5 and box.y0 >= page.y0 - 0.5 and box.x1 <= page.x1 + 0.5 and box.y1 <= page.y1 + 0.5
    others = [t.get_window_extent(renderer) for t in texts if t is not holder[0]]
    return inside, [o for o in others if box.overlaps(o)]


def test_the_figures_print_the_line_inside_the_canvas_off_other_text():
    pytest.importorskip("matplotlib")
    from attnlab.plot import multiview

    trace, _, _ = placed()
    line = trace.diagnostics(-1, 0).line()
    assert line.startswith("sink: 1 token")
    for fig in (multiview.views_figure(trace, 2, -1, 0, pyplot=False),
                multiview.views_word_grid(trace, -1, 0, words=[0, 1], pyplot=False)):
        inside, overlapping = _texts_overlap(fig, line)
        assert inside and overlapping == []
    fig = multiview.views_figure(trace, 2, 0, 0, pyplot=False)
    assert _texts_overlap(fig, "no sink tokens") == (True, [])
    assert not [p for ax in fig.axes for p in ax.patches if p.get_linestyle() == "--"]

    def dashed(fig):  # (panel title, box) of every dashed outline
        return [(ax.get_title(), (p.get_x(), p.get_y(), p.get_x() + p.get_width(), p.get_y() + p.get_height()))
                for ax in fig.axes for p in ax.patches if p.get_linestyle() == "--"]

    marks = dashed(multiview.views_figure(trace, 2, -1, 0, pyplot=False))
    assert len(marks) == 1 and marks[0][0].startswith("view 'tiles'") and marks[0][1] == pytest.approx(SINK_BOX)


def test_the_explorer_prints_the_line_of_the_shown_layer_and_head():
    pytest.importorskip("ipywidgets")
    from attnlab.explorer.multiview import ViewsExplorer

    trace, _, _ = placed()
    ex = ViewsExplorer(trace, layer=-1, head=0)
    assert trace.diagnostics(-1, 0).line() in ex.figure.get_suptitle().split("\n")
    ex.head_dropdown.value = 1
    assert "no sink tokens" in ex.figure.get_suptitle().split("\n")


def test_a_tiny_real_vlm_trace_reports_its_own_key_shares(built):
    pytest.importorskip("transformers", minversion="5")
    import vlm_tiny

    model, processor = built("llava_next")
    trace = attnlab.caption(attnlab.from_huggingface(model, processor, max_len=4), vlm_tiny.photo(1000, 200, seed=7))
    assert len(trace.views) > 1 and set(trace.key_shares) - {"prefix"}
    for layer, head in [(-1, "mean"), (0, 1)]:
        d = trace.diagnostics(layer, head)
        li = layer % trace.num_layers
        for kind, arr in trace.key_shares.items():
            want = arr[li].mean(0) if head == "mean" else arr[li, head]
            np.testing.assert_allclose(d.shares[kind], want, atol=1e-6)
        for i, v in enumerate(trace.views):
            m = trace.view_attention(i)[li]
            np.testing.assert_allclose(d.view_shares[v.name], (m.mean(0) if head == "mean" else m[head]).sum((-2, -1)), atol=1e-5)
        total = d.image + sum(d.shares.values())
        np.testing.assert_allclose(total, 1.0, atol=1e-3)  # views plus shares: the whole row
        maps = [np.asarray(trace.view_attention(i), dtype=np.float64) for i in range(len(trace.views))]
        got = {(s.view_index, s.row, s.col): s.words for s in d.sinks}
        assert got == pytest.approx(reference_sinks(maps, li, None if head == "mean" else head))


def test_the_html_views_page_prints_the_same_line(tmp_path):
    """The page's data holds the line of every layer and head, and its script, run in node on a stand-in DOM
    (tests/views_page_dom.js), writes it at the end of the label as the dropdowns change."""
    import json
    import re
    import shutil
    import subprocess
    from pathlib import Path

    from attnlab.plot.html_views_page import VIEWS_SCRIPT

    trace, _, _ = placed()
    page = attnlab.export_html(trace, tmp_path / "v.html")
    raw = re.search(r'<script type="application/json" id="attnlab-data">(.*?)</script>', page.read_text(), flags=re.S).group(1)
    data = json.loads(raw)
    for layer in range(L):
        for h, head in enumerate([0, 1, "mean"]):
            assert data["sinkLines"][layer][h] == trace.diagnostics(layer, head).line()
    node = shutil.which("node")
    if node is None:
        pytest.skip("no node to run the page's script")
    (tmp_path / "data.json").write_text(raw)
    (tmp_path / "script.js").write_text(VIEWS_SCRIPT)
    dom = Path(__file__).parent / "views_page_dom.js"
    run = subprocess.run([node, str(dom), str(tmp_path / "script.js"), str(tmp_path / "data.json"), "1,0", "1,1", "0,mean"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    labels = json.loads(run.stdout)
    wants = [trace.diagnostics(-1).line(), trace.diagnostics(1, 0).line(), trace.diagnostics(1, 1).line(), trace.diagnostics(0).line()]
    assert wants[1] == "sink: 1 token takes 23% for 75% of words" and wants[2] == "no sink tokens"
    for label, want in zip(labels, wants, strict=True):
        assert label.endswith(" \u00b7 " + want)


def test_the_explorer_of_one_prompted_view_prints_the_line_of_the_shown_layer_and_head():
    """A single view of the whole photo with a prompt's shares (Qwen2-VL's traces) is explored view by view, with
    every share printed; its title holds the sink line of the chosen layer and head."""
    pytest.importorskip("ipywidgets")
    trace, maps, shares = placed()
    tiles = maps[1] / (maps[1].sum((-2, -1), keepdims=True) / 0.75)  # the tiles view alone keeps the image's 75%
    one = CaptionTrace.from_views(trace.words, trace.token_ids, [View("image", (4, 6), (0.0, 0.0, 60.0, 40.0))], [tiles],
                                  trace.image, key_shares=shares)
    ex = attnlab.explore(one, layer=-1, head=0)
    assert type(ex).__name__ == "ViewsExplorer"
    want = one.diagnostics(-1, 0).line()
    assert want.startswith("sink: 1 token") and want in ex.figure.get_suptitle().split("\n")
    ex.head_dropdown.value = 1
    assert one.diagnostics(-1, 1).line() in ex.figure.get_suptitle().split("\n")
    assert one.diagnostics(-1, 1).line() == "no sink tokens"


def test_pieces_are_merged_into_words_as_the_figures_merge_them():
    """Sinks count words: a word of two pieces counts once, its map the mean of its pieces' maps."""
    trace, maps, shares = placed()
    starts = [True, False, True, True, True, True, True, False]  # 8 pieces, 6 words: (0, 1) and (6, 7) merged
    pieces = CaptionTrace.from_views(trace.words, trace.token_ids, VIEWS, maps, trace.image, key_shares=shares,
                                     word_starts=starts)
    d = pieces.diagnostics(-1, 0)
    assert d.words == ["w0w1", "w2", "w3", "w4", "w5", "w6w7"]
    cell = maps[1][1, 0, :, 1, 4]
    words = [cell[0:2].mean(), *cell[2:6], cell[6:8].mean()]  # 0.3 for words 0..4, 0 + noise for the last
    np.testing.assert_allclose(d.sink_share, words, atol=1e-6)
    assert d.sinks[0].words == pytest.approx(5 / 6)  # 5 of 6 words, where the pieces said 6 of 8
    assert d.line() == f"sink: 1 token takes {np.mean(words):.0%} for 83% of words"
    np.testing.assert_allclose(d.shares["prompt"], 0.15, atol=1e-6)
    assert len(d.image) == 6
