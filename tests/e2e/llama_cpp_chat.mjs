// Chat with a GGUF through real llama.cpp (node-llama-cpp's prebuilt CPU binary), using the GGUF's own chat template.
// node llama_cpp_chat.mjs MODEL.gguf MAX_TOKENS SYSTEM_PROMPT PROMPT...   → one JSON line: {"answers": [...]}
import os from "node:os";
import { getLlama, JinjaTemplateChatWrapper, LlamaChatSession } from "node-llama-cpp";

const [modelPath, maxTokens, systemPrompt, ...prompts] = process.argv.slice(2);
const llama = await getLlama({ gpu: false, build: "never" });
const model = await llama.loadModel({ modelPath });
// The default thread count does not follow the cores this machine gives (a 40-token answer took minutes).
const context = await model.createContext({ threads: Math.max(1, os.availableParallelism()) });
// The GGUF's own Jinja chat template, rendered as written (the "auto" wrapper would swap in a built-in ChatML one that
// opens with a BOS token, which for SmolLM2 is a second <|im_start|>).
const template = model.fileInfo.metadata.tokenizer.chat_template;
const chatWrapper = new JinjaTemplateChatWrapper({ template });
const answers = [];
for (const prompt of prompts) {
  const session = new LlamaChatSession({ contextSequence: context.getSequence(), systemPrompt, chatWrapper });
  answers.push(await session.prompt(prompt, { maxTokens: Number(maxTokens), temperature: 0 }));
  session.dispose({ disposeSequence: true });
}
console.log(JSON.stringify({ answers }));
await context.dispose();
await model.dispose();
