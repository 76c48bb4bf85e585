"""tunesmith eval: batched MMLU scoring equals a plain one-question-at-a-time scorer on the real (shipped) data."""

from __future__ import annotations

import csv
import json
import shutil
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunesmith.cli import main
from tunesmith.config.benchmark import load_benchmark_config, parse_task
from tunesmith.errors import ConfigError
from tunesmith.evaluate.benchmark import SHIPPED_TASK_DIR

SUBJECTS = ["abstract_algebra", "anatomy"]
LIMIT, N_SHOT = 12, 2


def read_mmlu(subject: str, split: str) -> list[list[str]]:
    path = SHIPPED_TASK_DIR / "mmlu" / "data" / split / f"{subject}_{split}.csv"
    return list(csv.reader(path.open(encoding="utf-8")))


def one_at_a_time(model_dir, chat: bool) -> dict[str, list[str]]:
    """The protocol written out plainly: prompt text per question, one forward pass, argmax over A-D."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    letters = ["A", "B", "C", "D"]

    def block(row):
        return row[0] + "".join(f"\n{letter}. {row[i + 1]}" for i, letter in enumerate(letters)) + "\nAnswer:"

    letter_ids = [tokenizer.encode(("" if chat else " ") + letter)[-1] for letter in letters]
    predictions = {}
    for subject in SUBJECTS:
        intro = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        shots = read_mmlu(subject, "dev")[:N_SHOT]
        predictions[subject] = []
        for row in read_mmlu(subject, "test")[:LIMIT]:
            if chat:
                messages = []
                for shot in shots:
                    messages += [{"role": "user", "content": block(shot)}, {"role": "assistant", "content": shot[5]}]
                messages.append({"role": "user", "content": block(row)})
                messages[0]["content"] = intro + messages[0]["content"]
                text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            else:
                text = intro + "".join(f"{block(shot)} {shot[5]}\n\n" for shot in shots) + block(row)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0, -1]
            predictions[subject].append(letters[int(logits[letter_ids].argmax())])
    return predictions


@pytest.mark.parametrize("template", ["empty", None])
def test_batched_accuracy_equals_one_question_at_a_time(contextual_tiny_model_dir, tmp_path, template):
    save_dir = tmp_path / "results"
    args = ["eval", "--model", str(contextual_tiny_model_dir), "--task", "mmlu_test", "--subjects", ",".join(SUBJECTS)]
    args += ["--limit", str(LIMIT), "--n_shot", str(N_SHOT), "--batch_size", "5", "--save_dir", str(save_dir)]
    if template:
        args += ["--template", template]
    assert main(args) == 0
    results = json.loads((save_dir / "results.json").read_text())

    expected = one_at_a_time(contextual_tiny_model_dir, chat=template is None)
    assert results["predictions"] == expected
    answers = {subject: [row[5] for row in read_mmlu(subject, "test")[:LIMIT]] for subject in SUBJECTS}
    hits = [p == a for s in SUBJECTS for p, a in zip(expected[s], answers[s], strict=True)]
    assert results["average"] == round(100 * sum(hits) / len(hits), 2)
    assert set(results["categories"]) == {"STEM", "Other"}  # abstract algebra is STEM, anatomy Other
    assert all(len(set(letters)) > 1 for letters in expected.values())  # answers depend on the question


def test_zip_task_dir_and_chinese_benchmarks(tiny_model_dir, tmp_path):
    # the same subjects zipped as the original archive is laid out give the same predictions as the unpacked files
    task_dir = tmp_path / "tasks"
    (task_dir / "cmmlu").mkdir(parents=True)
    shutil.copy(SHIPPED_TASK_DIR / "cmmlu" / "mapping.json", task_dir / "cmmlu")
    with zipfile.ZipFile(task_dir / "cmmlu" / "cmmlu.zip", "w") as archive:
        for path in (SHIPPED_TASK_DIR / "cmmlu").rglob("*.csv"):
            archive.write(path, str(path.relative_to(SHIPPED_TASK_DIR / "cmmlu")))
    common = ["--model", str(tiny_model_dir), "--subjects", "logical", "--limit", "6", "--n_shot", "1"]
    assert main(["eval", "--task", "cmmlu", *common, "--save_dir", str(tmp_path / "shipped")]) == 0
    zipped = ["eval", "--task", "cmmlu_test", "--task_dir", str(task_dir), *common, "--save_dir", str(tmp_path / "z")]
    assert main(zipped) == 0
    shipped = json.loads((tmp_path / "shipped" / "results.json").read_text())
    assert shipped == json.loads((tmp_path / "z" / "results.json").read_text())
    assert len(shipped["predictions"]["logical"]) == 6
    assert main(["eval", "--task", "ceval_validation", *common[:2], "--limit", "3", "--n_shot", "1"]) == 0


def test_eval_keys_are_checked():
    assert parse_task("ceval_validation") == ("ceval", "val") and parse_task("cmmlu") == ("cmmlu", "test")
    with pytest.raises(ConfigError, match="task"):
        load_benchmark_config(None, ["task=ceval_test"])  # C-Eval's test split has no answers
    with pytest.raises(ConfigError, match="temperature"):
        load_benchmark_config(None, ["temperature=0.5"])
    assert main(["eval", "--subjects", "astrology"]) == 2
