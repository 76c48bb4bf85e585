"""tunesmith eval --harness: lm-evaluation-harness on our loaded model agrees with our own MMLU scoring.

The harness runs a local MMLU task (lm-eval's own MMLU template with `dataset_path: json`, one task per subject, the
shipped subjects' rows converted to JSON) on the model tunesmith loads; our `tunesmith eval` scores the same rows
with the same protocol (plain-text few-shot prompt, the letter with the highest next-token logit).
"""

from __future__ import annotations

import csv
import json

import pytest

from tunesmith.cli import main
from tunesmith.config.benchmark import load_benchmark_config
from tunesmith.errors import ConfigError
from tunesmith.evaluate.benchmark import SHIPPED_TASK_DIR

pytest.importorskip("lm_eval")

SUBJECTS = ["abstract_algebra", "anatomy", "high_school_geography", "logical_fallacies"]
LIMIT, N_SHOT = 25, 2

TASK_YAML = """task: local_mmlu_{subject}
dataset_path: json
dataset_kwargs:
  data_files:
    dev: {dev}
    test: {test}
test_split: test
fewshot_split: dev
fewshot_config:
  sampler: first_n
description: "The following are multiple choice questions (with answers) about {name}.\\n\\n"
output_type: multiple_choice
doc_to_text: "{{{{question.strip()}}}}\\nA. {{{{choices[0]}}}}\\nB. {{{{choices[1]}}}}\\nC. {{{{choices[2]}}}}\\nD. \
{{{{choices[3]}}}}\\nAnswer:"
doc_to_choice: ["A", "B", "C", "D"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_local_mmlu_tasks(folder) -> None:
    """lm-eval's MMLU task format on the shipped subjects: JSON rows (question, choices, answer index)."""
    mapping = json.loads((SHIPPED_TASK_DIR / "mmlu" / "mapping.json").read_text())
    for subject in SUBJECTS:
        files = {}
        for split in ("dev", "test"):
            source = SHIPPED_TASK_DIR / "mmlu" / "data" / split / f"{subject}_{split}.csv"
            rows = [
                {"question": row[0], "choices": row[1:5], "answer": "ABCD".index(row[5].strip())}
                for row in csv.reader(source.open(encoding="utf-8"))
            ]
            files[split] = folder / f"{subject}_{split}.jsonl"
            files[split].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        name = mapping[subject]["name"]
        text = TASK_YAML.format(subject=subject, dev=files["dev"], test=files["test"], name=name)
        (folder / f"local_mmlu_{subject}.yaml").write_text(text, encoding="utf-8")


def test_harness_on_our_model_agrees_with_our_mmlu(contextual_tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_local_mmlu_tasks(tasks)
    common = ["--model", str(contextual_tiny_model_dir), "--template", "empty", "--n_shot", str(N_SHOT)]
    common += ["--limit", str(LIMIT), "--batch_size", "8"]

    harness_names = ",".join(f"local_mmlu_{subject}" for subject in SUBJECTS)
    args = ["eval", *common, "--harness", harness_names, "--include_path", str(tasks)]
    args += ["--save_dir", str(tmp_path / "h")]
    assert main(args) == 0
    harness = json.loads((tmp_path / "h" / "harness_results.json").read_text())

    ours_args = ["eval", *common, "--task", "mmlu", "--subjects", ",".join(SUBJECTS), "--save_dir", str(tmp_path / "o")]
    assert main(ours_args) == 0
    ours = json.loads((tmp_path / "o" / "results.json").read_text())

    # each subject has 25 rows (4 points a row), so agreement within 1 point means the same number right
    for subject in SUBJECTS:
        assert abs(100 * harness[f"local_mmlu_{subject}"]["acc"] - ours["subjects"][subject]) <= 1, subject
    overall = sum(harness[f"local_mmlu_{subject}"]["acc"] for subject in SUBJECTS) / len(SUBJECTS)
    assert abs(100 * overall - ours["average"]) <= 1
    assert len({ours["subjects"][subject] for subject in SUBJECTS}) > 1  # the scores depend on the questions


def test_harness_keys_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="subjects"):
        load_benchmark_config(None, ["harness=mmlu", "subjects=anatomy"])
    with pytest.raises(ConfigError, match="include_path"):
        load_benchmark_config(None, [f"include_path={tmp_path}"])


def test_missing_harness_names_the_extra(monkeypatch):
    import importlib.util

    from tunesmith.evaluate import harness

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real_find_spec(name, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'tunesmith\[harness\]'"):
        harness.require_harness()
