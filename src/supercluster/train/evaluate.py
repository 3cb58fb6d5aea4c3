"""`supercluster eval`: a run's loss and perplexity on a prepared dataset, and its accuracy on
multiple-choice tasks scored by log-likelihood.

Loss: every document of the dataset once, packed into rows of the run's `train.seq_len` with
document masking (each document is scored alone, as if it were the only one in the row); the
mean cross-entropy over every counted target (the assistant turns of chat data, every next
token of plain text; long plain documents continue in further rows), and its exponential.

Tasks: a JSONL file of {"question", "choices", "answer"} (the answer is the index of the right
choice or its text). Each choice is scored as evaluation harnesses (lm-evaluation-harness) do
it: the sum of the log-probabilities of its tokens after the question (the question's text,
then " " and the choice; the tokens of the choice are those the whole string adds to the
question's), `acc` takes the most likely choice, `acc_norm` the most likely per character of
the choice. With `chat`, the question is one user turn of the run's chat template and the choice
is the assistant's answer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from supercluster.errors import UserError

MAX_TASKS = 100_000


def load_model(run_dir: Path):
    from supercluster.hardware.device import select_device
    from supercluster.train.sample import load_trained

    device = select_device()
    return load_trained(run_dir).to(device).eval(), device


@torch.no_grad()
def data_loss(run_dir: Path, data: Path, seq_len: int | None = None, batch: int = 8, model=None) -> dict:
    """Mean loss and perplexity over the counted targets of every document of `data`."""
    from supercluster.data.mixture import open_dataset, run_tokenizer_digest
    from supercluster.data.packing import IGNORE, PackedSampler, packed_eval_batches
    from supercluster.train.config import load_config

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.toml")
    model, device = (model, next(model.parameters()).device) if model is not None else load_model(run_dir)
    dataset = open_dataset(data, model.cfg.vocab_size, run_tokenizer_digest(run_dir))
    seq_len = seq_len or cfg.train.seq_len
    if not 1 <= seq_len <= model.cfg.max_seq_len:
        raise UserError(f"--seq-len must be in 1..{model.cfg.max_seq_len} (the model's positions), got {seq_len}.")
    sampler = PackedSampler(dataset.tokens, dataset.doc_offsets, dataset.loss_masks, seq_len, batch, name="evaluation")
    total, counted = 0.0, 0
    for x, y, documents in packed_eval_batches(sampler):
        logits = model(x.to(device), documents=documents.to(device))
        total += float(F.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), ignore_index=IGNORE,
                                       reduction="sum"))
        counted += int((y != IGNORE).sum())
    loss = total / counted
    return {"loss": loss, "perplexity": math.exp(loss), "tokens_counted": counted, "documents": len(sampler.starts),
            "truncated_documents": sampler.truncated, "seq_len": seq_len, "data": str(data)}


def read_tasks(path: Path) -> list[dict]:
    """The multiple-choice questions of a JSONL file, checked; one sentence naming the line otherwise."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"Tasks file {str(path)!r} does not exist; give a JSONL file of question, choices and answer.")
    tasks = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{where} is not valid JSON ({err.msg}); each line must be one object.") from None
            if not isinstance(row, dict):
                raise UserError(f"{where} must be a JSON object with question, choices and answer.")
            unknown = set(row) - {"question", "choices", "answer", "id"}
            if unknown:
                raise UserError(f"{where} has the field {sorted(unknown)[0]!r}; a task has question, choices, answer "
                                f"(and an optional id).")
            question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
            if not isinstance(question, str) or not question.strip() or not isinstance(choices, list) or len(choices) < 2 \
                    or not all(isinstance(c, str) and c for c in choices):
                raise UserError(f"{where} needs a non-empty string question and a list of at least two non-empty string choices.")
            if isinstance(answer, str) and answer in choices:
                answer = choices.index(answer)
            if not (isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices)):
                raise UserError(f"{where}: answer must be the index (0..{len(choices) - 1}) or the text of one of "
                                f"the choices, got {answer!r}.")
            tasks.append({"question": question, "choices": choices, "answer": answer})
            if len(tasks) > MAX_TASKS:
                raise UserError(f"{str(path)!r} holds more than {MAX_TASKS:,} tasks; split it.")
    if not tasks:
        raise UserError(f"Tasks file {str(path)!r} holds no task.")
    return tasks


@torch.no_grad()
def choice_logprobs(model, device, context: list[int], continuation: list[int]) -> float:
    """Sum of log P(continuation token | everything before it)."""
    ids = torch.tensor([(context + continuation)[-model.cfg.max_seq_len - 1:]], device=device)
    logits = model(ids[:, :-1])[0].float()
    logprobs = torch.log_softmax(logits[-len(continuation):], dim=-1)
    targets = ids[0, -len(continuation):]
    return float(logprobs.gather(1, targets[:, None]).sum())


def score_tasks(run_dir: Path, tasks_file: Path, chat: bool = False, model=None) -> dict:
    """acc and acc_norm of the run on the tasks file, and each question's scores."""
    from supercluster.data.tokenizer import load_tokenizer

    run_dir = Path(run_dir)
    tasks = read_tasks(tasks_file)
    model, device = (model, next(model.parameters()).device) if model is not None else load_model(run_dir)
    tok = load_tokenizer(run_dir / "tokenizer.json")
    template = None
    if chat:
        from supercluster.data.chat import load_chat

        template = load_chat(run_dir, tok)
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    correct = correct_norm = 0
    rows = []
    for task in tasks:
        if template is not None:
            context_text = template.render([{"role": "user", "content": task["question"]}], add_generation_prompt=True)
            continuations = list(task["choices"])
        else:
            context_text, continuations = task["question"], [" " + choice for choice in task["choices"]]
        # The harnesses' way: trailing whitespace of the question moves into the choice, and the
        # choice's tokens are what encoding the whole adds to the question's own tokens.
        spaces = len(context_text) - len(context_text.rstrip())
        if spaces:
            continuations = [context_text[-spaces:] + c for c in continuations]
            context_text = context_text[:-spaces]
        context = encode(context_text)
        scores, norms = [], []
        for choice, continuation in zip(task["choices"], continuations):
            whole = encode(context_text + continuation)
            logprob = choice_logprobs(model, device, whole[:len(context)], whole[len(context):] or whole[-1:])
            scores.append(logprob)
            norms.append(logprob / len(choice))  # characters, as lm-eval's acc_norm
        best, best_norm = max(range(len(scores)), key=scores.__getitem__), max(range(len(norms)), key=norms.__getitem__)
        correct += best == task["answer"]
        correct_norm += best_norm == task["answer"]
        rows.append({"question": task["question"], "answer": task["answer"], "predicted": best,
                     "predicted_norm": best_norm, "logprobs": scores})
    n = len(tasks)
    return {"tasks": str(tasks_file), "questions": n, "acc": correct / n, "acc_norm": correct_norm / n,
            "chat": chat, "results": rows}
