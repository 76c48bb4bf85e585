// Greedy continuations of raw texts through real llama.cpp (node-llama-cpp's prebuilt CPU binary), as token ids.
// node llama_cpp_tokens.mjs MODEL.gguf MAX_TOKENS TEXT...   → one JSON line: [{"prompt": [ids], "generated": [ids]}]
import { getLlama } from "node-llama-cpp";

const [modelPath, maxTokens, ...texts] = process.argv.slice(2);
const llama = await getLlama({ gpu: false, build: "never" });
const model = await llama.loadModel({ modelPath });
const context = await model.createContext({ threads: 2 });
const results = [];
for (const text of texts) {
  const sequence = context.getSequence();
  const bos = model.tokens.shouldPrependBosToken ? [model.tokens.bos] : []; // as the GGUF's add_bos_token says
  const prompt = [...bos, ...model.tokenize(text)];
  const generated = [];
  for await (const token of sequence.evaluate(prompt, { temperature: 0 })) {
    generated.push(token);
    if (generated.length >= Number(maxTokens)) break;
  }
  results.push({ prompt: Array.from(prompt), generated });
  sequence.dispose();
}
console.log(JSON.stringify(results));
await context.dispose();
await model.dispose();
