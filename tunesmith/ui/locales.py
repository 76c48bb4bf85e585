"""The page's texts in English and Chinese, and the list of components to relabel when the language changes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LANGUAGES = ("en", "zh")

TEXTS: dict[str, tuple[str, str]] = {
    # key: (English, Chinese)
    "title": ("tunesmith: fine-tune, chat, evaluate and export", "tunesmith：微调、对话、评估与导出"),
    "language": ("Language", "语言"),
    "tab_train": ("Train", "训练"),
    "tab_chat": ("Chat", "对话"),
    "tab_evaluate": ("Evaluate & Predict", "评估与预测"),
    "tab_export": ("Export", "导出"),
    "tab_data": ("Data", "数据"),
    "model": ("Model (alias, local directory or hub id)", "模型（别名、本地目录或 Hub ID）"),
    "template": ("Chat template", "对话模板"),
    "stage": ("Stage", "训练阶段"),
    "method": ("Method", "微调方法"),
    "lora_rank": ("LoRA rank", "LoRA 秩"),
    "lora_alpha": ("LoRA alpha (0: 2 x rank)", "LoRA alpha（0：秩的 2 倍）"),
    "lora_dropout": ("LoRA dropout", "LoRA 随机丢弃"),
    "lora_target": ("LoRA target modules", "LoRA 目标模块"),
    "freeze_trainable_layers": ("Trainable layers (freeze)", "可训练层数（冻结微调）"),
    "dataset_dir": ("Dataset directory", "数据目录"),
    "dataset": ("Datasets", "数据集"),
    "preview_rows": ("Preview rows", "预览数据"),
    "rows": ("Rows", "数据行"),
    "cutoff_len": ("Cutoff length", "截断长度"),
    "learning_rate": ("Learning rate", "学习率"),
    "num_train_epochs": ("Epochs", "训练轮数"),
    "max_steps": ("Max steps (-1: by epochs)", "最大步数（-1：按轮数）"),
    "per_device_train_batch_size": ("Batch size per device", "每设备批大小"),
    "gradient_accumulation_steps": ("Gradient accumulation", "梯度累积"),
    "lr_scheduler_type": ("LR scheduler", "学习率调度"),
    "warmup_ratio": ("Warm-up ratio", "预热比例"),
    "logging_steps": ("Logging steps", "日志间隔"),
    "save_steps": ("Save steps", "保存间隔"),
    "val_size": ("Validation size", "验证集比例"),
    "seed": ("Seed", "随机种子"),
    "nproc_per_node": ("Processes per node", "每节点进程数"),
    "deepspeed": ("DeepSpeed config", "DeepSpeed 配置"),
    "output_dir": ("Output directory", "输出目录"),
    "overwrite_output_dir": ("Overwrite output directory", "覆盖输出目录"),
    "extra": ("More keys (YAML, e.g. name: Tunesmith)", "其他参数（YAML，例如 name: Tunesmith）"),
    "memory": ("Memory estimate", "显存/内存估算"),
    "preview_command": ("Preview command", "预览命令"),
    "save_yaml": ("Save YAML", "保存 YAML"),
    "start": ("Start", "开始"),
    "stop": ("Stop", "停止"),
    "resume": ("Resume", "继续训练"),
    "command": ("Command", "命令"),
    "log": ("Log", "日志"),
    "loss": ("Loss", "损失"),
    "adapter": ("Adapter directories (comma-separated)", "适配器目录（逗号分隔）"),
    "infer_dtype": ("Inference dtype", "推理精度"),
    "load": ("Load model", "加载模型"),
    "unload": ("Unload model", "卸载模型"),
    "system": ("System prompt", "系统提示词"),
    "query": ("Message", "输入"),
    "send": ("Send", "发送"),
    "clear": ("Clear", "清空"),
    "max_new_tokens": ("Max new tokens", "最大生成长度"),
    "temperature": ("Temperature (0: greedy)", "温度（0：贪心）"),
    "top_p": ("Top-p", "Top-p"),
    "top_k": ("Top-k", "Top-k"),
    "repetition_penalty": ("Repetition penalty", "重复惩罚"),
    "chatbot": ("Conversation", "对话"),
    "eval_mode": ("Run", "运行"),
    "max_samples": ("Max samples", "最大样本数"),
    "batch_size": ("Batch size", "批大小"),
    "task": ("Benchmark", "评测基准"),
    "n_shot": ("Shots", "示例数"),
    "limit": ("Questions per subject (0: all)", "每科题数（0：全部）"),
    "results": ("Results", "结果"),
    "predictions": ("Predictions", "预测结果"),
    "export_dir": ("Export directory", "导出目录"),
    "export_size": ("Largest shard (e.g. 2GB, 200MB)", "最大分片（如 2GB、200MB）"),
    "export_gguf": ("GGUF types", "GGUF 类型"),
    "export_num_ctx": ("Modelfile num_ctx (0: the model's)", "Modelfile num_ctx（0：模型默认）"),
    "export": ("Export", "导出"),
    "check": ("Check data", "检查数据"),
    "preview_examples": ("Preview examples (trained tokens highlighted)", "预览样本（高亮训练的 token）"),
    "num_examples": ("Examples", "样本数"),
    "status": ("Status", "状态"),
    # job states, shown in the progress line
    "idle": ("No job yet.", "暂无任务。"),
    "preparing": ("Starting: loading the model and the data ...", "启动中：正在加载模型和数据……"),
    "running": ("Running", "运行中"),
    "finished": ("finished", "已完成"),
    "stopped": ("stopped (checkpoint saved; press Resume to continue)", "已停止（已保存检查点，可继续训练）"),
    "stopped_early": ("stopped before the first checkpoint (none written)", "在首个检查点之前停止（未保存）"),
    "failed": ("failed", "失败"),
    "stopping": ("stopping: saving a checkpoint after this step ...", "正在停止：本步结束后保存检查点……"),
    "exit_code": ("exit code", "退出码"),
    "saved_to": ("Saved to", "已保存到"),
    "fits": ("fits", "可以放下"),
    "does_not_fit": ("does NOT fit: change the settings before Start", "放不下：请在开始前修改设置"),
    "loaded": ("Loaded", "已加载"),
    "unloaded": ("No model loaded.", "未加载模型。"),
    "busy": ("A {kind} job is already running; stop it first.", "已有{kind}任务在运行，请先停止。"),
    "tokens_per_second": ("tokens/s", "tokens/秒"),
    "no_model": ("Load a model first.", "请先加载模型。"),
}


def text(key: str, lang: str) -> str:
    english, chinese = TEXTS[key]
    return chinese if lang == "zh" else english


@dataclass
class Labels:
    """The components whose label (or value, for buttons and headings) is a text: relabelled on a language change."""

    lang: str = "en"  # the language the page opens in
    entries: list[tuple[Any, str, str]] = field(default_factory=list)

    def add(self, component: Any, key: str, attribute: str = "label") -> Any:
        """Give `component` its text in the page's first language and remember it for relabelling."""
        setattr(component, attribute, text(key, self.lang))
        self.entries.append((component, key, attribute))
        return component

    @property
    def components(self) -> list[Any]:
        return [component for component, _, _ in self.entries]

    def updates(self, lang: str) -> list[Any]:
        """One update per component, in `components` order: the same component class with only the text set."""
        return [type(component)(**{attribute: text(key, lang)}) for component, key, attribute in self.entries]
