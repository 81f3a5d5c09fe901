"""CaseOps: the lossless capitalisation transform of the PR #2135 record (`prepare.text_transform: caseops`).

This module owns the transform and the original-byte count of transformed text:

* `encode(text)` rewrites every ASCII capital as lower case plus an operator character, so the
  tokenizer sees lower-case words only and learns one piece for "the", "The" and "THE";
* `decode(encoded)` is its exact inverse: `decode(encode(t)) == t` for every string t;
* `original_bytes(encoded)` is, per character of encoded text, how many UTF-8 bytes of the
  ORIGINAL text it stands for (an operator 0, anything else its own length); summed over a
  token's span it is that token's entry of the validation byte sidecar (pgolf.shared.val_bytes),
  so val_bpb is counted on the untransformed text.

The operators are four private-use characters (the reserved pieces of the CaseOps SentencePiece
model, ids 4-7 there). A word is a maximal run of ASCII letters [A-Za-z]; other characters pass
unchanged (non-ASCII capitals included).

    TITLE   U+E001  before a word whose first letter is a capital (then CAPNEXT for later capitals)
    ALLCAPS U+E002  before a word of two or more letters, all capitals
    CAPNEXT U+E003  inside a word, before a letter that was a capital
    ESC     U+E004  before an operator character that was in the text itself

    "The NASA iPhone" -> TITLE "the " ALLCAPS "nasa i" CAPNEXT "phone"
"""

from __future__ import annotations

import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESC = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = (TITLE, ALLCAPS, CAPNEXT, ESC)

# a word holding a capital (only at a word start: no ASCII letter before it), or an operator character
_ENCODE_RE = re.compile(r"(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*|[\ue001-\ue004]")
_CAPITAL_RE = re.compile(r"[A-Z]")
# an operator with what it applies to; the last branch is an operator with nothing valid after it,
# or a capital, which encoded text never holds
_DECODE_RE = re.compile(r"\ue004([\ue001-\ue004])|\ue002([a-z]+)|\ue001([a-z])|\ue003([a-z])|([\ue001-\ue004A-Z])",
                        re.DOTALL)


class CaseOpsError(ValueError):
    """Text that is not the output of `encode` (an operator out of place), or a tokenizer without the operators."""


def _encode_match(m: re.Match) -> str:
    w = m.group()
    if w in OPERATORS:
        return ESC + w
    if len(w) >= 2 and w.isupper():
        return ALLCAPS + w.lower()
    head = TITLE + w[0].lower() if "A" <= w[0] <= "Z" else w[0]
    return head + _CAPITAL_RE.sub(lambda c: CAPNEXT + c.group().lower(), w[1:])


def encode(text: str) -> str:
    """The CaseOps form of `text`: lower-case ASCII letters plus operators (module docstring)."""
    return _ENCODE_RE.sub(_encode_match, text)


def _is_letter(ch: str) -> bool:
    return "a" <= ch <= "z" or "A" <= ch <= "Z"


def _decode_match(m: re.Match) -> str:
    s, i = m.string, m.start()
    escaped, allcaps, title, capnext, bad = m.groups()
    if escaped is not None:
        return escaped
    if bad is not None:
        what = "a capital letter" if bad.isalpha() else f"operator U+{ord(bad):04X} with no letter after it"
        raise CaseOpsError(f"not CaseOps text: {what} at character {i}")
    before = s[i - 1] if i > 0 else ""
    if capnext is not None:
        if not ("a" <= before <= "z"):
            raise CaseOpsError(f"not CaseOps text: CAPNEXT at character {i} is not inside a word")
        return capnext.upper()
    if _is_letter(before):
        raise CaseOpsError(f"not CaseOps text: a word operator at character {i} inside a word")
    if allcaps is not None:
        after = s[m.end()] if m.end() < len(s) else ""
        if len(allcaps) < 2 or after == CAPNEXT:
            raise CaseOpsError(f"not CaseOps text: ALLCAPS at character {i} before {allcaps + after!r}")
        return allcaps.upper()
    return title.upper()


def decode(encoded: str) -> str:
    """The original text of `encode`'s output; CaseOpsError on text `encode` cannot produce
    (an operator out of place, a capital letter)."""
    return _DECODE_RE.sub(_decode_match, encoded)


def original_bytes(encoded: str) -> np.ndarray:
    """int64[len(encoded)]: the UTF-8 bytes of the original text each character of `encode`'s output
    stands for: 0 for an operator, the character's own UTF-8 length otherwise (for an escaped
    operator character: 0 for the ESC, 3 for the character itself)."""
    cp = np.frombuffer(encoded.encode("utf-32-le"), dtype="<u4")
    weight = (1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)).astype(np.int64)
    ops = (cp >= 0xE001) & (cp <= 0xE004)
    if ops.any():
        weight[ops] = 0
        last_literal = -1
        for i in np.flatnonzero(cp == ord(ESC)).tolist():  # rare: the text itself held operator characters
            if i == last_literal:  # an escaped ESC, not an escape
                continue
            if i + 1 >= len(cp) or not ops[i + 1]:
                raise CaseOpsError(f"not CaseOps text: ESC at character {i} escapes no operator")
            weight[i + 1] = 3  # every operator character is 3 bytes of UTF-8
            last_literal = i + 1
    return weight


def piece_original_bytes(encoded: str, offsets) -> np.ndarray:
    """int64[n]: the original UTF-8 bytes of each of n tokens of `encoded`, given their (begin, end)
    character spans (SentencePiece's offset mapping: a span covers the input text the piece came
    from, an empty span for all but the last byte piece of a character)."""
    cum = np.concatenate([[0], np.cumsum(original_bytes(encoded))])
    if len(offsets) == 0:
        return np.zeros(0, dtype=np.int64)
    span = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    return cum[span[:, 1]] - cum[span[:, 0]]


def check_tokenizer(sp, source: str) -> None:
    """CaseOpsError unless the SentencePiece model has each operator as one piece of its own
    (the CaseOps model reserves them as user-defined symbols, ids 4-7)."""
    missing = [f"U+{ord(op):04X}" for op in OPERATORS
               if sp.piece_to_id(op) == sp.unk_id() or sp.encode(op) != [sp.piece_to_id(op)]]
    if missing:
        raise CaseOpsError(f"{source}: prepare.text_transform is caseops but the tokenizer lacks the CaseOps "
                           f"operator piece(s) {', '.join(missing)} (use a CaseOps .model, e.g. data/tokenizer_src/"
                           f"fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model, or tokenizer: train)")
