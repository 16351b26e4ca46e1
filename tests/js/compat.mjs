// The OpenAI Node SDK and LangChain.js's ChatOpenAI against the proxy's OpenAI-compatible
// routes, as an application would configure them (a base URL and an API key).
//
//   node compat.mjs '{"baseURL": "...", "model": "...", "calls": ["chat", ...]}'
//
// The key comes from OPENAI_API_KEY. Prints one JSON line per call.
import OpenAI from "openai";
import { ChatOpenAI } from "@langchain/openai";

const spec = JSON.parse(process.argv[2]);
const messages = [{ role: "user", content: "Hello" }];

function describe(err) {
  return { error: err.constructor.name, status: err.status, message: err.message };
}

const calls = {
  async chat() {
    const client = new OpenAI({ baseURL: spec.baseURL, maxRetries: 0 });
    const reply = await client.chat.completions.create({ model: spec.model, messages });
    return { text: reply.choices[0].message.content, usage: reply.usage };
  },

  async "chat-stream"() {
    const client = new OpenAI({ baseURL: spec.baseURL, maxRetries: 0 });
    const stream = await client.chat.completions.create({
      model: spec.model,
      messages,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let usage = null;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta?.content ?? "";
      usage = chunk.usage ?? usage;
    }
    return { text, usage };
  },

  async responses() {
    const client = new OpenAI({ baseURL: spec.baseURL, maxRetries: 0 });
    const reply = await client.responses.create({ model: spec.model, input: "Hello" });
    return { text: reply.output_text, id: reply.id };
  },

  async refused() {
    const client = new OpenAI({ baseURL: spec.baseURL, maxRetries: 0 });
    await client.chat.completions.create({ model: spec.refusedModel, messages });
    return { error: null };
  },

  async langchain() {
    const chat = new ChatOpenAI({
      model: spec.model,
      configuration: { baseURL: spec.baseURL },
      maxRetries: 0,
    });
    const reply = await chat.invoke("Hello");
    let streamed = "";
    for await (const chunk of await chat.stream("Hello")) streamed += chunk.content;
    return { text: reply.content, streamed };
  },
};

for (const name of spec.calls) {
  try {
    console.log(JSON.stringify({ call: name, ...(await calls[name]()) }));
  } catch (err) {
    console.log(JSON.stringify({ call: name, ...describe(err) }));
  }
}
