"""EleutherAI lm-evaluation-harness adapter: evaluate a Murmur run or model directory on standard tasks.

Importing this module registers the model class as "murmur" in lm-eval's registry. Three ways in:

    murmur eval runs/demo --lm-eval hellaswag,arc_easy            # Murmur's command
    python -m murmur.eval.lm_eval_adapter --model murmur --model_args pretrained=runs/demo --tasks arc_easy
    run_lm_eval("runs/demo", ["my_task"], include_path="my_tasks/")  # from Python

Every text is scored as a document after <|endoftext|>, as in pretraining; the continuation's tokens
are those of tokenize(context + continuation) after tokenize(context), as lm-eval's Hugging Face
model does, with the context's trailing spaces moved into the continuation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from murmur.errors import MurmurError
from murmur.eval.bpb import document_windows
from murmur.eval.scoring import scored_sequences, sequence_logprobs


def load_model_and_tokenizer(src: str | Path, device: str = "cpu"):
    """The model at `src` (run folder, checkpoint or Hugging Face directory) and its ChatTokenizer."""
    from murmur.source import load_model
    from murmur.tokenizer import ChatTokenizer

    loaded = load_model(src, device=device)
    if loaded.tokenizer_dir is None:
        raise MurmurError(f"{src} has no tokenizer (tokenizer.json); export the model with its tokenizer "
                          "(`murmur export RUN --out DIR`) or pass the run folder")
    return loaded.model.eval(), ChatTokenizer.load(loaded.tokenizer_dir)


@register_model("murmur")
class MurmurLM(LM):
    """lm-eval's LM interface over a Murmur Transformer: loglikelihood, loglikelihood_rolling, generate_until."""

    def __init__(self, pretrained: str | None = None, model=None, tokenizer=None, device: str = "cpu",
                 batch_size: int | str = 16, max_length: int | None = None, **_ignored: Any):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise MurmurError("the murmur lm-eval model needs pretrained=RUN_OR_MODEL_DIR")
            import torch

            # lm-eval's command line asks for "cuda" unless told otherwise; a CPU-only machine still runs.
            if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
                device = "cpu"
            model, tokenizer = load_model_and_tokenizer(pretrained, device=device)
        if tokenizer is None:
            raise MurmurError("the murmur lm-eval model needs a tokenizer")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" means our default
        self.max_length = min(int(max_length or model.settings.max_seq_len), model.settings.max_seq_len)

    def _split(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, tokenised together so the boundary merges as in running text."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context) if context else []
        return [self.tokenizer.eos_id, *whole[:len(context_ids)]], whole[len(context_ids):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """log p(continuation | context) and whether greedy decoding would produce the continuation."""
        sequences, starts = [], []
        for request in requests:
            context_ids, continuation_ids = self._split(*request.args[:2])
            if not continuation_ids:
                raise MurmurError("lm-eval asked for the likelihood of an empty continuation")
            # Keep the last max_length + 1 tokens: the continuation and as much context as fits.
            sequence = (context_ids + continuation_ids)[-(self.max_length + 1):]
            sequences.append(sequence)
            starts.append(max(1, len(sequence) - len(continuation_ids)))
        results = scored_sequences(self.model, sequences, starts, self.batch_size)
        return [(float(lp.sum()), greedy) for lp, greedy in results]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of whole documents, in windows of the model's context when they are longer."""
        windows, owner = [], []
        for index, request in enumerate(requests):
            ids = [self.tokenizer.eos_id, *self.tokenizer.encode(request.args[0])]
            for window in document_windows(ids, self.max_length + 1):
                windows.append(window)
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, lp in zip(owner, sequence_logprobs(self.model, windows, [1] * len(windows), self.batch_size)):
            totals[index] += float(lp.sum())
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continue each context (greedy unless do_sample) until a stop string or max_gen_toks."""
        from murmur.infer.engine import Engine
        from murmur.infer.sampling import SamplingParams

        if not requests:
            return []
        engine = Engine(self.model, self.tokenizer, max_batch_size=min(self.batch_size, len(requests)))
        prompts, params = [], []
        for request in requests:
            context, gen_kwargs = request.args[0], dict(request.args[1] or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_tokens = max(1, min(int(gen_kwargs.get("max_gen_toks", 256)), self.max_length // 2))
            sample = bool(gen_kwargs.get("do_sample", False))
            temperature = float(gen_kwargs.get("temperature", 1.0 if sample else 0.0)) if sample else 0.0
            ids = [self.tokenizer.eos_id, *self.tokenizer.encode(context)]
            prompts.append(ids[-(self.max_length - max_tokens):])
            params.append(SamplingParams(temperature=temperature, max_tokens=max_tokens, stop=until, seed=0))
        return [c.text for c in engine.generate(prompts, params)]


def run_lm_eval(model: str | Path | LM, tasks: list[str], include_path: str | Path | None = None,
                limit: float | None = None, num_fewshot: int | None = None, batch_size: int = 16,
                device: str = "cpu", include_defaults: bool = True) -> dict:
    """Evaluate `model` (a path, or a MurmurLM) on lm-eval `tasks`; returns {task: {metric: value}}.

    include_path adds a folder of task YAML files (local tasks need no download); include_defaults=False
    skips indexing lm-eval's thousands of built-in tasks (seconds) when only local ones are wanted."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = model if isinstance(model, LM) else MurmurLM(pretrained=str(model), device=device, batch_size=batch_size)
    manager = TaskManager(include_path=str(include_path) if include_path else None,
                          include_defaults=include_defaults or not include_path)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        raise MurmurError(f"unknown lm-eval task(s): {', '.join(missing)}; list them with `lm_eval ls tasks`, "
                          "or pass --lm-eval-include DIR for a folder of task YAML files")
    output = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                             log_samples=False, bootstrap_iters=0)
    return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in output["results"].items()}


if __name__ == "__main__":  # lm-eval's own command line, with "murmur" registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
