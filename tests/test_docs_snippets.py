"""Every code snippet of the documentation runs, and every link between its files resolves.

The documentation is README.md and docs/*.md (a glob: a new page is covered when it lands).

Fences, the convention every page follows:

* ```python   runnable code. Each block is executed on its own, in a fresh namespace, with
              the repository root as the working directory: a block must define what it uses
              (tiny tensors and models inline; no ``student`` from nowhere) and should run in
              well under 5 seconds on a CPU. One pytest test per block, named
              ``FILE:LINE`` (the line of the opening fence), e.g. ``README.md:68``.
* ```text     anything that looks like Python but is not run: signature listings, printed
              output, formulas. ```bash for shell commands (not run either).
* ```py, ```python3, ```pycon, ```ipython, and info strings such as ```python-signature,
  are refused (a test fails), so that a block is never left out of the run by the spelling
  of its fence. A failing block's traceback names the markdown file and its line numbers.

A block that needs something the machine may lack is marked by an HTML comment on the line
directly above its fence (blank lines in between are allowed, nothing else):

    <!-- snippet: requires cuda -->
    <!-- snippet: requires trl -->
    <!-- snippet: requires transformers, cuda -->

``cuda`` means ``torch.cuda.is_available()``; any other name is a module that must import
(``trl``, ``transformers``, ``triton``...). Where a requirement is missing the test is
*skipped* with that reason, never passed. A marker that is not of this form fails the test
(a typo must not skip a block silently). There is no other way to skip a block.

After each block the test destroys a default torch.distributed process group the block
left behind (a block that fails half-way must not break the next one).
"""
from __future__ import annotations

import importlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
# Wall-clock guard per block: snippets are written to take < 5 s; this only catches a block
# that grew real shapes (the CI machines are small and shared, so the guard is generous).
SNIPPET_TIME_LIMIT_S = 30.0

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(?P<body>.*?)\s*-->\s*$")
REQUIRES = re.compile(r"^requires\s+(?P<names>[A-Za-z_][\w.]*(\s*,\s*[A-Za-z_][\w.]*)*)$")
REFUSED_INFO = {"py", "python3", "pycon", "ipython", "py3"}


def doc_files() -> List[Path]:
    return [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))


@dataclass
class Snippet:
    path: Path
    line: int  # 1-based line of the opening fence
    code: str
    requires: Tuple[str, ...]
    marker_error: Optional[str] = None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


@dataclass
class Fence:
    line: int
    info: str
    indent: str
    body: List[str]


def fences(text: str) -> List[Fence]:
    """The fenced blocks of a markdown text (CommonMark: a closing fence has the same
    character, at least as many of them, and no info string)."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        ticks, info, indent = m.group("ticks"), m.group("info").strip(), m.group("indent")
        body, j = [], i + 1
        while j < len(lines):
            close = re.match(r"^[ \t]*(`{3,}|~{3,})\s*$", lines[j])
            if close and close.group(1)[0] == ticks[0] and len(close.group(1)) >= len(ticks):
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        out.append(Fence(i + 1, info, indent, body))
        i = j + 1
    return out


def _marker_above(lines: List[str], fence_line: int) -> Tuple[Tuple[str, ...], Optional[str]]:
    """The requirements of the marker directly above the fence at ``fence_line`` (1-based)."""
    k = fence_line - 2
    while k >= 0 and not lines[k].strip():
        k -= 1
    if k < 0 or "snippet:" not in lines[k]:
        return (), None
    m = MARKER.match(lines[k])
    body = m.group("body") if m else lines[k].strip()
    req = REQUIRES.match(body) if m else None
    if req is None:
        return (), (f"line {k + 1}: bad snippet marker {lines[k].strip()!r}; "
                    f"the only form is <!-- snippet: requires NAME[, NAME...] -->")
    return tuple(n.strip() for n in req.group("names").split(",")), None


def snippets(path: Path) -> List[Snippet]:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    out = []
    for fence in fences(text):
        if fence.info.split()[:1] != ["python"]:
            continue
        requires, error = _marker_above(lines, fence.line)
        out.append(Snippet(path, fence.line, "\n".join(fence.body) + "\n", requires, error))
    return out


ALL_SNIPPETS = [s for path in doc_files() for s in snippets(path)]


def missing_requirement(names: Tuple[str, ...]) -> Optional[str]:
    for name in names:
        if name == "cuda":
            if not torch.cuda.is_available():
                return "requires cuda: no CUDA device"
            continue
        try:
            importlib.import_module(name)
        except ImportError as exc:
            return f"requires {name}: {exc}"
    return None


@pytest.mark.parametrize("snippet", ALL_SNIPPETS, ids=[s.id for s in ALL_SNIPPETS])
def test_snippet_runs(snippet: Snippet, monkeypatch):
    if snippet.marker_error:
        pytest.fail(f"{snippet.id}: {snippet.marker_error}")
    reason = missing_requirement(snippet.requires)
    if reason:
        pytest.skip(f"{snippet.id}: {reason}")
    monkeypatch.chdir(ROOT)
    # Padded so that a traceback names the markdown file and its own line numbers.
    code = compile("\n" * snippet.line + snippet.code, str(snippet.path), "exec")
    namespace = {"__name__": "__docs_snippet__"}
    start = time.perf_counter()
    try:
        exec(code, namespace)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    elapsed = time.perf_counter() - start
    assert elapsed < SNIPPET_TIME_LIMIT_S, f"{snippet.id} took {elapsed:.1f} s; snippets use tiny shapes"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_fence_is_collected(path: Path):
    """The parser finds every ```python fence (a raw count agrees), refuses the spellings that
    would dodge the run, and a page that has Python code has snippets: never a vacuous pass."""
    text = path.read_text(encoding="utf-8")
    refused = [f"{path.name}:{f.line} (```{f.info})" for f in fences(text) if _refused_info(f.info)]
    assert not refused, f"use ```python (run) or ```text (not run): {refused}"
    raw = len(re.findall(r"^[ \t]*(`{3,}|~{3,})[ \t]*python([ \t]|$)", text, flags=re.M))
    found = [s for s in ALL_SNIPPETS if s.path == path]
    assert len(found) == raw, f"{path.name}: {raw} ```python fences, {len(found)} collected"
    if raw:
        assert found, f"{path.name} has python fences but no snippet was collected"


def _refused_info(info: str) -> bool:
    word = (info.split() or [""])[0]
    return word.lower() in REFUSED_INFO or (word.lower().startswith("python") and word != "python")


def test_readme_has_snippets():
    assert any(s.path.name == "README.md" for s in ALL_SNIPPETS), "README.md lost its runnable quickstart"
    assert len(ALL_SNIPPETS) > 0


# ---------------------------------------------------------------------------------------
# Links

LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(\s+\"[^\"]*\")?\)")


def _outside_code(text: str, blank_spans: bool = True) -> List[Tuple[int, str]]:
    """(line number, line) of the lines that are not inside fenced blocks, with inline code
    spans blanked out unless ``blank_spans`` is False (a link inside backticks is an
    example, not a link; a heading keeps its code spans' text in its anchor)."""
    in_fence, fence_char, out = False, "", []
    for n, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if m and not in_fence:
            in_fence, fence_char = True, m.group("ticks")[0]
            continue
        if in_fence:
            if re.match(rf"^[ \t]*{re.escape(fence_char)}{{3,}}\s*$", line):
                in_fence = False
            continue
        out.append((n, re.sub(r"`[^`]*`", "``", line) if blank_spans else line))
    return out


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"`|\*\*|__", "", heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    seen, out = {}, set()
    for _, line in _outside_code(path.read_text(encoding="utf-8"), blank_spans=False):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            a = github_anchor(m.group(1))
            k = seen.get(a, 0)
            out.add(a if k == 0 else f"{a}-{k}")
            seen[a] = k + 1
    return out


def links(path: Path) -> List[Tuple[int, str]]:
    return [(n, m.group("target")) for n, line in _outside_code(path.read_text(encoding="utf-8"))
            for m in LINK.finditer(line)]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path: Path):
    """Relative links point at files that exist; #anchors into markdown files at headings."""
    bad = []
    for n, target in links(path):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            bad.append(f"{path.name}:{n}: {target} (no such file)")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{path.name}:{n}: {target} (no heading with anchor #{anchor} in {dest.name})")
    assert not bad, "broken links:\n  " + "\n  ".join(bad)


def test_docs_have_links_to_check():
    """The link test is not vacuous: the README links into docs/."""
    assert any(t.startswith("docs/") for _, t in links(ROOT / "README.md"))


def test_collector_understands_markers(tmp_path):
    """The marker grammar: requirements are read, blank lines allowed, typos rejected."""
    page = tmp_path / "page.md"
    page.write_text("x\n<!-- snippet: requires cuda, trl -->\n\n```python\npass\n```\n"
                    "<!-- snippet: require cuda -->\n```python\npass\n```\n"
                    "```python\nprint(1)\n```\n", encoding="utf-8")
    got = snippets(page)
    assert [(s.line, s.requires, s.marker_error is None) for s in got] == [
        (4, ("cuda", "trl"), True), (8, (), False), (11, (), True)]
    assert missing_requirement(("no_such_module_fastkd_docs",)).startswith("requires no_such_module_fastkd_docs")


def test_ci_runs_the_readme_test_command():
    """.ci/run's last command is the README's second one (install everything, run the suite)."""
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert len(blocks) >= 2 and "pytest" in blocks[1]
    assert ci_command == blocks[1].strip()
