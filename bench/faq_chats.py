"""A small real chat dataset for SFT benchmarks: the question/answer pairs of FAQs that Debian packages ship, as
JSONL rows prepare.py --format chat reads.

    python bench/faq_chats.py --out bench/out/sft/faq_chats.jsonl             # both FAQs, ~30% multi-turn rows
    python bench/faq_chats.py --out bench/out/sft/faq_chats.jsonl --multi-turn-fraction 0.3 --seed 0
    python bench/faq_chats.py --sources python                                 # only the Python FAQ

Sources (the text is never ours: every question and answer is a FAQ entry's own words):
- python: CPython's FAQ, /usr/share/doc/python3.X/html/faq/*.html, from `apt-get install python3-doc` (which pulls
  python3.X-doc). Sphinx HTML; every question is a <section> whose heading is the question. 179 pairs (3.11) of
  plain technical English, often with a code example; the best single source, but short of the ~300 pairs wanted.
- debian: the Debian FAQ, /usr/share/doc/debian/FAQ/*.en.html, from `apt-get install debian-faq`. DocBook HTML;
  every question is a <div class="section"> whose heading is "N.M. question". 123 more pairs (11.1), about
  installing and running Debian, so that the set is not all one topic. The other packages apt offers with "faq"
  in their name or description here are this FAQ's translations.
Both come from the Debian archive, offline and versioned, and neither needs anything beyond the standard library.

A question is a section below a page's top section whose heading asks something ("?"), or one without
subsections outside any question (Python's "I try to use __spam and I get an error ..."); a section with
subsections that asks nothing is a group of questions (e.g. "Performance"), and one inside a question that asks
nothing is part of that question's answer, introduced by its heading (the Debian FAQ's "dpkg", "APT" under "What
programs does Debian provide ...?"). An answer is the text of its sections: HTML stripped, whitespace collapsed
outside code, one paragraph (or code block, or run of list items) per blank-line-separated block. Answers that
are empty or only code are dropped, and answers are cut to MAX_ANSWER_CHARS at a paragraph boundary.

Each pair is used in exactly one row, so a row-level train/val split never shows an answer on both sides: mostly
single-turn rows, and with probability MULTI_TURN_FRACTION a row holds the next 2-3 questions of the same group
as one conversation.
Each row has a "source": the file under /usr/share/doc and the anchors of its questions ("file#a,b").
The output is written to a temp file and renamed, so a half-written file is never left at OUT.
"""
import glob
import html.parser
import itertools
import json
import os
import random
import re
import sys
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from config import ConfigError, check_fraction, configure  # noqa: E402

OUT: str = os.path.join(REPO, "bench", "out", "sft", "faq_chats.jsonl")  # the JSONL file written
SOURCES: list[str] = ["python", "debian"]  # which FAQs (names in FAQS below) to read; all must be installed
MULTI_TURN_FRACTION: float = 0.3  # chance that a row starts a 2-3 question conversation instead of one question
SEED: int = 0  # seeds the choice of multi-turn rows and their lengths: the same seed, the same file
MAX_ANSWER_CHARS: int = 1500  # answers are cut to whole paragraphs within this many characters
DOC_ROOT: str = "/usr/share/doc"  # where Debian packages put documentation; "source" paths are relative to it


@dataclass
class Faq:
    """Where one package's FAQ lives and how to get it."""
    dir_glob: str  # the FAQ's directory under DOC_ROOT (a glob: the newest match is used)
    file_glob: str  # its pages in that directory
    skip: tuple  # pages that hold no questions (tables of contents, notes about the FAQ itself)
    install: str  # the command that installs it


FAQS = {
    "python": Faq("python3.*/html/faq", "*.html", ("index.html",),
                  "apt-get install --no-install-recommends python3-doc"),
    # faqinfo is the FAQ's colophon (authors, formats, feedback) and nextrelease a list of plans, not questions
    "debian": Faq("debian/FAQ", "*.en.html", ("index.en.html", "faqinfo.en.html", "nextrelease.en.html"),
                  "apt-get install --no-install-recommends debian-faq"),
}
# section containers: Sphinx's <section>, DocBook's <div class="chapter"> / <div class="section">
SECTION_CLASSES = {"chapter", "section"}
# regions that are navigation, not answer text (tables of contents, page headers and footers)
SKIP_CLASSES = {"toc", "contents", "navheader", "navfooter"}
# elements whose content is never text (Sphinx's pilcrow links after headings are dropped too)
SKIP_TAGS = {"script", "style"}
# elements that start and end a block of text
BLOCK_TAGS = {"p", "pre", "li", "dt", "dd", "blockquote", "table", "tr", "ul", "ol", "dl", "br", "div", "section",
              "h1", "h2", "h3", "h4", "h5", "h6"}
HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}
# DocBook numbers its headings ("2.1. Where can I get ..."); the number is not part of the question
HEADING_NUMBER = re.compile(r"^\d+(\.\d+)*\.\s+")


@dataclass(eq=False)  # identity: sections are dict keys
class Section:
    anchor: str
    depth: int  # 1 for a page's top section
    parent: "Section | None"
    title: str | None = None
    blocks: list = field(default_factory=list)  # (kind, text): kind is "text", "item" (of a list), "code", "heading"
    has_subsections: bool = False


class FaqPage(html.parser.HTMLParser):
    """One FAQ page -> its sections in document order, each with its title and its own blocks of text."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections, self.open_sections = [], []
        self.containers = []  # per open div/section/nav: (is a section, is skipped)
        self.skipping = 0  # open containers that are navigation
        self.skip_tag = None  # an open element whose text is dropped
        self.lists = []  # per open ul/ol: [ordered, items so far]
        self.buffer, self.in_pre, self.in_heading = [], False, False
        self.item_prefix = self.label = ""  # "- " for the next list item; "Note: " for the block after a label

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if self.skip_tag:
            return
        if tag in SKIP_TAGS or (tag == "a" and "headerlink" in classes):
            self.skip_tag = tag
            return
        if tag in BLOCK_TAGS:
            self.flush()
        if tag in ("div", "section", "nav"):
            is_section = tag == "section" or (tag == "div" and bool(classes & SECTION_CLASSES))
            is_skip = tag == "nav" or bool(classes & SKIP_CLASSES)
            self.containers.append((is_section, is_skip))
            self.skipping += is_skip
            if is_section and not self.skipping:
                self.open_section(attrs.get("id"))
        elif self.skipping:
            return
        elif tag in ("ul", "ol"):
            self.lists.append([tag == "ol", 0])
        elif tag == "li" and self.lists:
            self.lists[-1][1] += 1
            ordered, n = self.lists[-1]
            self.item_prefix = "  " * (len(self.lists) - 1) + (f"{n}. " if ordered else "- ")
        elif tag == "pre":
            self.in_pre = True
        elif tag in HEADINGS:
            self.in_heading = True
        elif tag == "p" and "admonition-title" in classes:
            self.in_heading = True  # Sphinx's "Note" / "See also": a label, as DocBook's admonition headings
        if self.open_sections and self.open_sections[-1].anchor is None and attrs.get("id"):
            self.open_sections[-1].anchor = attrs["id"]  # DocBook puts the anchor in the heading: <a id=...>

    def handle_endtag(self, tag):
        if self.skip_tag:
            self.skip_tag = None if tag == self.skip_tag else self.skip_tag
            return
        if tag in BLOCK_TAGS:
            self.flush()
        if tag in ("div", "section", "nav") and self.containers:
            is_section, is_skip = self.containers.pop()
            if is_section and not self.skipping and self.open_sections:
                self.open_sections.pop()
            self.skipping -= is_skip
        elif self.skipping:
            return
        elif tag in ("ul", "ol") and self.lists:
            self.lists.pop()
        elif tag == "li":
            self.item_prefix = ""  # an item without text (a link, an image) leaves no prefix for the next block
        elif tag == "pre":
            self.in_pre = False
        if tag in HEADINGS or tag == "p":
            self.in_heading = False

    def handle_data(self, data):
        if not self.skip_tag and not self.skipping and self.open_sections:
            self.buffer.append(data)

    def open_section(self, anchor):
        parent = self.open_sections[-1] if self.open_sections else None
        if parent:
            parent.has_subsections = True
        section = Section(anchor, len(self.open_sections) + 1, parent)
        self.item_prefix = self.label = ""  # what the last section left unused is not the new one's
        self.sections.append(section)
        self.open_sections.append(section)

    def flush(self):
        """End the block being read: a section's title, a label for the next block, or a block of its text."""
        raw, self.buffer = "".join(self.buffer), []
        if self.in_pre:  # code keeps its lines and indentation
            text = "\n".join(line.rstrip() for line in raw.strip("\n").split("\n"))
        else:
            text = " ".join(raw.split())
        if not text or not self.open_sections:
            return
        section = self.open_sections[-1]
        if self.in_heading and section.title is None:
            section.title = HEADING_NUMBER.sub("", text)
        elif self.in_heading:
            self.label = f"{text.rstrip(':')}: "
        elif section.title is not None and self.in_pre:
            if self.label:  # a label right before code ("Example:") stays with it
                section.blocks.append(("text", self.label.rstrip()))
            section.blocks.append(("code", text))
            self.label = ""
        elif section.title is not None:
            kind = "item" if self.item_prefix else "text"
            section.blocks.append((kind, self.item_prefix + self.label + text))
            self.item_prefix = self.label = ""


# ----------------------------------------------------------------------------------------------------------
# Pages -> (question, answer) pairs

@dataclass
class Pair:
    question: str
    answer: str
    file: str  # relative to DOC_ROOT
    anchor: str
    group: str  # the section that holds the question: multi-turn rows stay inside one group


def faq_files(name):
    """The pages of FAQ `name`, sorted; exits saying how to install the package when they are not there."""
    faq = FAQS[name]
    dirs = sorted(glob.glob(os.path.join(DOC_ROOT, faq.dir_glob)),
                  key=lambda d: [int(n) for n in re.findall(r"\d+", os.path.relpath(d, DOC_ROOT))])
    files = sorted(glob.glob(os.path.join(dirs[-1], faq.file_glob))) if dirs else []
    files = [f for f in files if os.path.basename(f) not in faq.skip]
    if not files:
        sys.exit(f"faq_chats.py: the {name} FAQ ({os.path.join(DOC_ROOT, faq.dir_glob, faq.file_glob)}) is not "
                 f"installed; install it with `{faq.install}` (as root), or leave '{name}' out of --sources")
    return files


def answer_text(blocks, max_chars):
    """The blocks as plain text (list items one per line, other blocks separated by a blank line), cut after the
    last whole block that fits in max_chars. None when nothing fits or no prose is left (code alone is no answer)."""
    kept, length = [], 0
    for i, (kind, text) in enumerate(blocks):
        separator = 0 if i == 0 else (1 if kind == "item" and blocks[i - 1][0] == "item" else 2)
        if length + separator + len(text) > max_chars:
            # an answer cut short should not end on "For example:" or a heading whose text was cut
            while kept and (kept[-1][0] == "heading" or kept[-1][1].endswith(":")):
                kept.pop()
            break
        kept.append((kind, text))
        length += separator + len(text)
    if all(kind in ("code", "heading") for kind, _ in kept):
        return None
    parts = [kept[0][1]]
    for (kind_before, _), (kind, text) in zip(kept, kept[1:]):
        parts.append(("\n" if kind == kind_before == "item" else "\n\n") + text)
    return "".join(parts)


def is_question(section, under_question):
    """A question is a section below a page's top one whose heading asks something, or one without subsections
    that is not inside a question (Python's "I try to use __spam and I get an error ..." asks without a "?")."""
    return section.depth >= 2 and ("?" in section.title or (not section.has_subsections and not under_question))


def question_blocks(sections):
    """{question section: its answer's blocks}, in document order. Sections inside a question that do not ask
    anything themselves (the Debian FAQ's "dpkg", "APT" under "What programs does Debian provide ...?") are part
    of its answer, each introduced by its heading; a question inside a question is a question of its own."""
    owner, answers = {}, {}
    for section in sections:  # parents come before their subsections
        parent_owner = owner.get(section.parent)
        if is_question(section, parent_owner is not None):
            owner[section] = section
            answers[section] = list(section.blocks)
        elif parent_owner is not None:
            owner[section] = parent_owner
            answers[parent_owner] += [("heading", section.title)] + section.blocks
    return answers


def read_pairs(path, max_chars, dropped):
    """The question/answer pairs of one page, in document order; counts why questions were dropped."""
    page = FaqPage()
    with open(path, encoding="utf-8") as f:
        page.feed(f.read())
    page.close()
    if any(not s.title or not s.anchor for s in page.sections):
        raise ValueError(f"{path}: a section without a heading or an anchor; the page's markup is not what "
                         f"FaqPage expects (Sphinx <section id> or DocBook <div class=\"section\"> with <a id>)")
    pairs, rel = [], os.path.relpath(path, DOC_ROOT)
    for section, blocks in question_blocks(page.sections).items():
        if not blocks:
            dropped["empty"] += 1
            continue
        answer = answer_text(blocks, max_chars)
        if answer is None:
            dropped["code_only" if len(blocks[0][1]) <= max_chars else "first_block_too_long"] += 1
            continue
        pairs.append(Pair(section.title, answer, rel, section.anchor, section.parent.anchor))
    return pairs


# ----------------------------------------------------------------------------------------------------------
# Pairs -> chat rows

def chat_rows(pairs, multi_turn_fraction, seed):
    """One row per question, or per 2-3 consecutive questions of one group; every pair in exactly one row."""
    rng = random.Random(seed)
    rows = []
    for _, group in itertools.groupby(pairs, key=lambda p: (p.file, p.group)):
        group = list(group)
        i = 0
        while i < len(group):
            turns = rng.choice((2, 3)) if rng.random() < multi_turn_fraction else 1
            turns = min(turns, len(group) - i)
            chunk = group[i:i + turns]
            messages = [m for p in chunk for m in ({"role": "user", "content": p.question},
                                                   {"role": "assistant", "content": p.answer})]
            rows.append({"messages": messages, "source": f"{chunk[0].file}#{','.join(p.anchor for p in chunk)}"})
            i += turns
    return rows


def write_jsonl(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(f"{path}.tmp", path)


if __name__ == "__main__":
    configure(globals())
    check_fraction(globals(), ["MULTI_TURN_FRACTION"])
    unknown = [s for s in SOURCES if s not in FAQS]
    if unknown or not SOURCES:
        raise ConfigError(f"sources = {SOURCES!r}; expected one or more of {sorted(FAQS)}")
    dropped = {"empty": 0, "code_only": 0, "first_block_too_long": 0}
    pairs = []
    for name in SOURCES:
        for path in faq_files(name):
            page_pairs = read_pairs(path, MAX_ANSWER_CHARS, dropped)
            print(f"{path}: {len(page_pairs)} pairs")
            pairs += page_pairs
    rows = chat_rows(pairs, MULTI_TURN_FRACTION, SEED)
    write_jsonl(rows, OUT)
    multi = sum(len(r["messages"]) > 2 for r in rows)
    chars = sum(len(m["content"]) for r in rows for m in r["messages"])
    print(f"wrote {OUT}: {len(pairs)} pairs in {len(rows)} rows ({len(rows) - multi} single-turn, {multi} "
          f"multi-turn), {chars:,} characters of content; questions dropped: "
          f"{', '.join(f'{k} {v}' for k, v in dropped.items())}")
