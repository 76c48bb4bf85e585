"""Multiple-choice benchmarks (MMLU, C-Eval, CMMLU) scored the classic way, as LLaMA-Factory's old `eval` did.

For each subject: `n_shot` solved examples from its dev split, then the question; the answer is the letter among
A/B/C/D whose token has the highest logit right after the prompt. The prompt goes through the model's chat template
(shots as user/assistant turns, the subject's instruction at the start of the first user turn), or, with
`template: empty` (or LLaMA-Factory's `fewshot`), is plain text for base models: "...\nAnswer: A\n\n" per shot.

Data: a task_dir holding `mmlu/`, `ceval/`, `cmmlu/`, each the original zip (`mmlu.zip`, ...) or its unpacked files,
with `mapping.json` (subject → display name and category). The default is the subset shipped in benchmarks/.
Accuracy is reported per subject, per category and over all questions (each question counts once), in percent.
"""

from __future__ import annotations

import csv
import io
import json
import random
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.chat.engine import ChatEngine, load_chat_engine
from tunesmith.config.benchmark import BenchmarkConfig, BenchmarkSection
from tunesmith.errors import ConfigError, DataError, OutputDirError

SHIPPED_TASK_DIR = Path(__file__).parent / "benchmarks"
LETTERS = ("A", "B", "C", "D")
PLAIN_TEMPLATES = ("empty", "fewshot")  # no chat template: the prompt is plain text, for base models
CATEGORIES = ("STEM", "Social Sciences", "Humanities", "Other")
RESULTS_FILE = "results.json"

INSTRUCTION = {
    "en": "The following are multiple choice questions (with answers) about {subject}.\n\n",
    "zh": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
}
ANSWER_CUE = {"en": "\nAnswer:", "zh": "\n答案："}


@dataclass(frozen=True)
class Question:
    text: str
    choices: tuple[str, str, str, str]
    answer: str  # A, B, C or D


@dataclass(frozen=True)
class BenchmarkFiles:
    """One benchmark's files: where each split of a subject lives, in the zip or unpacked."""

    name: str
    folder: Path

    def member(self, split: str, subject: str) -> str:
        if self.name == "mmlu":
            return f"data/{split}/{subject}_{split}.csv"
        if self.name == "ceval":
            return f"{split}/{subject}_{split}.csv"
        return f"{split}/{subject}.csv"  # cmmlu

    @property
    def has_header(self) -> bool:
        return self.name != "mmlu"

    def mapping(self) -> dict[str, dict[str, str]]:
        path = self.folder / "mapping.json"
        if not path.is_file():
            raise DataError(f"{path} not found; a benchmark folder needs mapping.json (subject → name and category)")
        return json.loads(path.read_text(encoding="utf-8"))

    def questions(self, split: str, subject: str) -> list[Question]:
        member = self.member(split, subject)
        archive = self.folder / f"{self.name}.zip"
        if archive.is_file():
            with zipfile.ZipFile(archive) as opened:
                if member not in opened.namelist():
                    raise DataError(f"{archive} has no {member}")
                text = opened.read(member).decode("utf-8")
        elif (self.folder / member).is_file():
            text = (self.folder / member).read_text(encoding="utf-8")
        else:
            raise DataError(f"neither {archive} nor {self.folder / member} exists")
        rows = list(csv.reader(io.StringIO(text)))
        if self.has_header:
            rows = rows[1:]
        offset = 0 if self.name == "mmlu" else 1  # C-Eval and CMMLU start with an id column
        questions = []
        for number, row in enumerate(rows, start=1 + self.has_header):
            fields = row[offset : offset + 6]
            if len(fields) != 6 or fields[5].strip() not in LETTERS:
                raise DataError(f"{self.folder / member} line {number}: expected question, A, B, C, D and the letter")
            questions.append(Question(fields[0], tuple(fields[1:5]), fields[5].strip()))
        return questions


def run_benchmark(config: BenchmarkConfig) -> dict[str, Any]:
    settings = config.benchmark
    files = BenchmarkFiles(settings.benchmark, Path(settings.task_dir or SHIPPED_TASK_DIR) / settings.benchmark)
    mapping = files.mapping()
    subjects = choose_subjects(settings, mapping)
    save_dir = Path(settings.save_dir) if settings.save_dir else None
    if save_dir is not None and (save_dir / RESULTS_FILE).exists():
        raise OutputDirError(f"{save_dir / RESULTS_FILE} exists; choose another save_dir or remove it")

    inference = config.inference
    plain = inference.prompt.template in PLAIN_TEMPLATES
    template = "empty" if plain else inference.prompt.template
    engine = load_chat_engine(inference.model, template, inference.engine.infer_dtype)
    scorer = LetterScorer(engine, plain, settings.language, settings.batch_size)

    predictions: dict[str, list[str]] = {}
    correct: dict[str, list[bool]] = {}
    for subject in subjects:
        questions = files.questions(settings.split, subject)[: settings.limit]
        shots = choose_shots(files.questions("dev", subject), settings.n_shot, settings.seed)
        prompts = [scorer.prompt(mapping[subject]["name"], shots, question) for question in questions]
        predictions[subject] = scorer.letters(prompts)
        correct[subject] = [p == q.answer for p, q in zip(predictions[subject], questions, strict=True)]
        print(f"eval: {subject}: {percent(correct[subject]):.2f} ({len(questions)} questions)")

    results = summarize(correct, mapping, predictions)
    print(results_table(results))
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return results


def choose_subjects(settings: BenchmarkSection, mapping: dict[str, dict[str, str]]) -> list[str]:
    unknown = [subject for subject in settings.subjects if subject not in mapping]
    if unknown:
        raise ConfigError(
            f"`subjects`: {', '.join(unknown)} not in {settings.benchmark}'s mapping.json; known: {', '.join(mapping)}"
        )
    return settings.subjects or sorted(mapping)


def choose_shots(dev: list[Question], n_shot: int, seed: int | None) -> list[Question]:
    if n_shot > len(dev):
        raise ConfigError(f"`n_shot`: got {n_shot}, but the dev split has {len(dev)} examples; use at most that")
    return dev[:n_shot] if seed is None else random.Random(seed).sample(dev, n_shot)


class LetterScorer:
    """Builds each prompt and picks the letter with the highest next-token logit, a batch of prompts at a time."""

    def __init__(self, engine: ChatEngine, plain: bool, language: str, batch_size: int):
        self.engine, self.plain, self.language, self.batch_size = engine, plain, language, batch_size
        tokenizer = engine.tokenizer
        # After "Answer:" in plain text the letter is a new word (" A"); a chat reply starts with the letter itself.
        spaced = plain and language == "en"
        self.letter_ids = [
            tokenizer.encode((" " if spaced else "") + letter, add_special_tokens=False)[-1] for letter in LETTERS
        ]

    def block(self, question: Question) -> str:
        choices = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, question.choices, strict=True))
        return question.text + choices + ANSWER_CUE[self.language]

    def prompt(self, subject_name: str, shots: list[Question], question: Question) -> list[int]:
        instruction = INSTRUCTION[self.language].format(subject=subject_name)
        tokenizer = self.engine.tokenizer
        if self.plain:
            space = " " if self.language == "en" else ""
            solved = "".join(f"{self.block(shot)}{space}{shot.answer}\n\n" for shot in shots)
            return tokenizer(instruction + solved + self.block(question))["input_ids"]
        messages = []
        for shot in shots:
            messages += [{"role": "user", "content": self.block(shot)}, {"role": "assistant", "content": shot.answer}]
        messages.append({"role": "user", "content": self.block(question)})
        messages[0]["content"] = instruction + messages[0]["content"]
        return tokenizer(self.engine.render(messages), add_special_tokens=False)["input_ids"]

    def letters(self, prompts: list[list[int]]) -> list[str]:
        """The chosen letter of each prompt, in prompt order; batches of similar length, padded on the right."""
        order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]), reverse=True)
        chosen: dict[int, str] = {}
        pad_id = self.engine.tokenizer.pad_token_id or 0
        letter_ids = torch.tensor(self.letter_ids)
        for start in range(0, len(order), self.batch_size):
            indices = order[start : start + self.batch_size]
            lengths = [len(prompts[index]) for index in indices]
            input_ids = torch.full((len(indices), max(lengths)), pad_id, dtype=torch.long)
            attention_mask = torch.zeros_like(input_ids)
            for row, index in enumerate(indices):
                input_ids[row, : lengths[row]] = torch.tensor(prompts[index])
                attention_mask[row, : lengths[row]] = 1
            with torch.inference_mode():
                logits = self.engine.model(
                    input_ids=input_ids.to(self.engine.device), attention_mask=attention_mask.to(self.engine.device)
                ).logits
            last = logits[torch.arange(len(indices)), torch.tensor(lengths) - 1].float().cpu()
            for row, index in enumerate(indices):
                chosen[index] = LETTERS[int(last[row, letter_ids].argmax())]
        return [chosen[index] for index in range(len(prompts))]


def percent(flags: list[bool]) -> float:
    return 100 * sum(flags) / len(flags) if flags else 0.0


def summarize(
    correct: dict[str, list[bool]], mapping: dict[str, dict[str, str]], predictions: dict[str, list[str]]
) -> dict[str, Any]:
    by_category: dict[str, list[bool]] = defaultdict(list)
    for subject, flags in correct.items():
        by_category[mapping[subject]["category"]].extend(flags)
    every = [flag for flags in correct.values() for flag in flags]
    ordered = [name for name in CATEGORIES if name in by_category] + sorted(set(by_category) - set(CATEGORIES))
    return {
        "average": round(percent(every), 2),
        "categories": {name: round(percent(by_category[name]), 2) for name in ordered},
        "subjects": {subject: round(percent(flags), 2) for subject, flags in correct.items()},
        "predictions": predictions,
    }


def results_table(results: dict[str, Any]) -> str:
    lines = [f"{'Average':>20}: {results['average']:.2f}"]
    lines += [f"{name:>20}: {value:.2f}" for name, value in results["categories"].items()]
    return "\n".join(lines)
