"""Tokenizers in a merge: compatibility checks, `base` and `union` vocabularies, rows re-indexed by token.

Embedding and output-head rows are tokens. With `tokenizer_source: base | union | <model>` each
model's rows are re-indexed by token string into the output vocabulary. A token that a model lacks
is left out of that row's merge: the row is merged over the models that have the token (with their
parameters; the base row, if the base lacks it, is the mean of theirs). It is never merged as zeros,
which is what garbles mergekit unions (its issues #139, #342). Rows no model has (padding) get the
mean of the merged rows. Tied embeddings need nothing special: a tied head is the embedding, merged
once. Without tokenizer_source, tokenizers must map tokens to the same ids, or the merge is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mlc.errors import MlcError


@dataclass
class VocabPlan:
    """The output vocabulary and, per model index, the input row of each output row (-1: absent)."""

    size: int
    rows: dict[int, torch.Tensor]
    tokenizer: Any = None  # a tokenizers.Tokenizer to save (union), or None to copy the source's files
    source: int = 0  # model index whose tokenizer files are copied
    added: list[str] = field(default_factory=list)


def read_vocab(model_dir: Path) -> tuple[dict[str, int], str] | None:
    """token -> id (added tokens included) and the tokenizer model type, from tokenizer.json; None if absent."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    model = data.get("model") or {}
    vocab = dict(model.get("vocab") or {}) if isinstance(model.get("vocab"), dict) else {}
    if isinstance(model.get("vocab"), list):  # Unigram: [[piece, score], ...]
        vocab = {piece: i for i, (piece, _score) in enumerate(model["vocab"])}
    for tok in data.get("added_tokens") or []:
        vocab[tok["content"]] = tok["id"]
    return vocab, str(model.get("type", "?"))


def plan_vocab(plan: Any, problems: list[str]) -> VocabPlan | None:
    """Check tokenizers and, when the config merges them, build the row re-indexing of vocabulary tensors."""
    models = plan.models
    vocab_jobs = [j for j in plan.jobs if j.group in ("embeddings", "head") and _is_vocab(plan, j)]
    used = sorted({m for j in vocab_jobs for m, _ in j.inputs + ([j.base] if j.base else [])})
    source = plan.config.tokenizer_source
    if not vocab_jobs:
        return None
    vocabs = {m: read_vocab(models[m].assets) for m in used}
    if source is None:
        _check_same(plan, vocabs, problems)
        return None
    missing = [models[m].ref for m, v in vocabs.items() if v is None]
    if missing:
        problems.append(f"tokenizer_source {source} needs tokenizer.json in every model; missing in {', '.join(missing)}")
        return None
    kinds = {v[1] for v in vocabs.values()}
    if len(kinds) > 1:
        problems.append(f"tokenizers are of different kinds ({', '.join(sorted(kinds))}); their vocabularies cannot be merged")
        return None
    donor = plan.donor if plan.donor in vocabs else used[0]
    if source in ("base", "union"):
        src = donor
    else:
        src = next((i for i, m in enumerate(models) if m.ref == source), None)
        if src is None or (src not in vocabs and read_vocab(models[src].assets) is None):
            problems.append(f"tokenizer_source {source} has no tokenizer.json")
            return None
        vocabs.setdefault(src, read_vocab(models[src].assets))
    limit = {m: int(models[m].config.get("vocab_size", 1 << 62)) for m in vocabs}
    out_vocab = {t: i for t, i in vocabs[src][0].items() if i < limit[src]}
    tokenizer, added = None, []
    if source == "union":
        tokenizer, out_vocab, added = _union(models, used, src, vocabs, limit)
    size = max(out_vocab.values()) + 1
    pad = plan.config.pad_to_multiple_of
    if pad and size % pad:
        size += pad - size % pad
    rows = {}
    for m in used:
        vocab = vocabs[m][0]
        index = torch.full((size,), -1, dtype=torch.long)
        for tok, out_id in out_vocab.items():
            in_id = vocab.get(tok)
            if in_id is not None and in_id < limit[m]:
                index[out_id] = in_id
        rows[m] = index
    for job in vocab_jobs:
        job.vocab = True
        job.shape = (size, *job.shape[1:])
    return VocabPlan(size, rows, tokenizer, src, added)


def _is_vocab(plan: Any, job: Any) -> bool:
    for m, name in job.inputs + ([job.base] if job.base else []):
        size = plan.models[m].config.get("vocab_size")
        shape = plan.models[m].tensors.info(name).shape
        if not shape or size is None or shape[0] != size:
            return False
    return True


def _check_same(plan: Any, vocabs: dict[int, Any], problems: list[str]) -> None:
    known = {m: v[0] for m, v in vocabs.items() if v is not None}
    if len(known) < 2:
        return
    ref_m = plan.donor if plan.donor in known else next(iter(known))
    ref = known[ref_m]
    for m, vocab in known.items():
        differ = [t for t, i in vocab.items() if ref.get(t, i) != i]
        only = len(set(vocab) ^ set(ref))
        if differ or only:
            example = f" (e.g. {differ[0]!r})" if differ else ""
            problems.append(
                f"tokenizer of {plan.models[m].ref} differs from {plan.models[ref_m].ref}: "
                f"{len(differ)} tokens have other ids{example}, {only} tokens are in only one; "
                "set tokenizer_source: union (or base) to re-index embeddings by token"
            )


def _union(models: list[Any], used: list[int], src: int, vocabs: dict[int, Any], limit: dict[int, int]) -> tuple[Any, dict[str, int], list[str]]:
    """The source tokenizer extended with every token the other models have, in their id order."""
    from tokenizers import AddedToken, Tokenizer

    tokenizer = Tokenizer.from_file(str(models[src].assets / "tokenizer.json"))
    present = set(tokenizer.get_vocab(with_added_tokens=True))
    added = []
    for m in [src] + [m for m in used if m != src]:
        special = _special_tokens(models[m].assets)
        for tok, i in sorted(vocabs[m][0].items(), key=lambda kv: kv[1]):
            if tok in present or i >= limit[m]:
                continue
            tokenizer.add_tokens([AddedToken(tok, special=tok in special, normalized=tok not in special)])
            present.add(tok)
            added.append(tok)
    return tokenizer, tokenizer.get_vocab(with_added_tokens=True), added


def _special_tokens(model_dir: Path) -> set[str]:
    data = json.loads(Path(model_dir, "tokenizer.json").read_text())
    return {t["content"] for t in data.get("added_tokens") or [] if t.get("special")}


def reindex_merge(plan: Any, job: Any, inputs: list[torch.Tensor], base: torch.Tensor | None, rng: torch.Generator | None) -> torch.Tensor:
    """Merge a vocabulary tensor row by row over the models that have each row's token."""
    method, vocab = plan.method, plan.vocab
    order = [m for m, _ in job.inputs]
    rows = [vocab.rows[m] for m in order]
    base_rows = vocab.rows[job.base[0]] if job.base else None
    present = torch.stack([r >= 0 for r in rows]) if rows else torch.zeros((0, vocab.size), dtype=torch.bool)
    codes = (present.long() * (1 << torch.arange(len(rows))).unsqueeze(1)).sum(0) if rows else torch.zeros(vocab.size, dtype=torch.long)
    if base_rows is not None:
        codes = codes + (base_rows >= 0).long() * (1 << len(rows))
    dtype = inputs[0].dtype if inputs else base.dtype  # type: ignore[union-attr]
    out = torch.zeros((vocab.size, *job.shape[1:]), dtype=torch.float32 if dtype != torch.float64 else dtype)
    filled = torch.zeros(vocab.size, dtype=torch.bool)
    for code in torch.unique(codes).tolist():
        at = torch.nonzero(codes == code).squeeze(1)
        members = [i for i in range(len(rows)) if code >> i & 1]
        xs = [inputs[i].index_select(0, rows[i][at]) for i in members]
        b = base.index_select(0, base_rows[at]) if base is not None and code >> len(rows) & 1 else None
        if not xs and b is None:
            continue  # no model has these tokens: filled with the mean below
        if b is None and method.base == "required" and xs:
            b = torch.stack(xs).mean(0).to(dtype)  # the base lacks the token: the present models' mean stands in
        params = {k: [v[i] for i in members] if isinstance(v, list) else v for k, v in job.params.items()}
        if method.count_problem(len(xs), b is not None or method.base != "required") is None:
            merged = method.fn(xs, b, params, rng)
        else:  # too few models have these tokens for the method: their plain mean
            merged = torch.stack(xs + ([b] if b is not None else [])).float().mean(0)
        out[at] = merged.to(out.dtype)
        filled[at] = True
    if not bool(filled.all()) and bool(filled.any()):
        out[~filled] = out[filled].mean(0)
    return out


def write_tokenizer(plan: Any, out_dir: Path) -> list[str]:
    """Write the output tokenizer: the union tokenizer, or the source model's files; return file names."""
    from mlc.io.hfdir import copy_tokenizer_files

    src_index = plan.vocab.source if plan.vocab is not None else plan.donor
    src = plan.models[src_index].assets
    written = copy_tokenizer_files(src, out_dir)
    if plan.vocab is not None and plan.vocab.tokenizer is not None:
        plan.vocab.tokenizer.save(str(out_dir / "tokenizer.json"))
        cfg_path = out_dir / "tokenizer_config.json"
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
            decoder = cfg.get("added_tokens_decoder")
            if isinstance(decoder, dict):
                for tok_id, tok in plan.vocab.tokenizer.get_added_tokens_decoder().items():
                    decoder.setdefault(str(tok_id), {
                        "content": tok.content, "lstrip": tok.lstrip, "normalized": tok.normalized,
                        "rstrip": tok.rstrip, "single_word": tok.single_word, "special": tok.special,
                    })
            cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
        written = sorted(set(written) | {"tokenizer.json"})
    return written


def set_chat_template(plan: Any, out_dir: Path) -> None:
    """Apply chat_template: auto (the most common among the inputs), a built-in name, or a Jinja string."""
    from mlc.commands.merge import chat_templates

    choice = plan.config.chat_template
    if not choice:
        return
    if choice == "auto":
        found = [t for t in (chat_templates.read_template(m.assets) for m in plan.models) if t]
        if not found:
            return
        template = max(set(found), key=found.count)
    else:
        template = chat_templates.lookup(choice)
        if template is None:
            raise MlcError(f"chat_template {choice!r} is not auto, a built-in name ({', '.join(chat_templates.NAMES)}) or a Jinja template")
    chat_templates.write_template(out_dir, template)
