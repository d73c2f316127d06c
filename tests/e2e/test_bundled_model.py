"""The bundled SmolLM2-135M-Instruct GGUF as a user meets it: `python -m sgjax.server` with no --model-path,
asked through the official openai client, SGLang's native /generate and the frontend language over HTTP.
Oracle: the model's true answers (Paris), and the same greedy text whichever way it is asked."""

import socket
import subprocess
import sys

import openai
import pytest

import sgjax as sgl
from sgjax.models.default_model import SERVED_NAME
from tests.e2e.test_server import post, wait_until_healthy

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sgjax.server", "--port", str(port), "--context-length", "512",
                             "--max-running-requests", "4", "--no-engine-process"],
                            env={"JAX_PLATFORMS": "cpu", "PATH": ""}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url, timeout=300)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def test_openai_chat_answers_with_the_bundled_model(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == [SERVED_NAME]
    reply = client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=16, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"  # the model's own <|im_end|> ends it


def test_native_generate_and_frontend_language_give_the_same_greedy_answer(server):
    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    chat = client.chat.completions.create(model=SERVED_NAME, messages=[{"role": "user", "content": QUESTION}],
                                          max_tokens=16, temperature=0).choices[0].message.content

    @sgl.function
    def ask(s):
        s += sgl.user(QUESTION)
        s += sgl.assistant(sgl.gen("answer", max_tokens=16, temperature=0))

    state = ask.run(backend=sgl.RuntimeEndpoint(server))
    assert state["answer"] == chat

    prompt = state.text()[: state.text().rindex(chat)]  # the chat template's text, as the frontend sent it
    status, body = post(server + "/generate", {"text": prompt,
                                               "sampling_params": {"max_new_tokens": 16, "temperature": 0}}, key=None)
    assert status == 200, body
    assert body["text"] == chat and "Paris" in body["text"]
