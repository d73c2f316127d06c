"""SGLang-style programs written once against the frontend API, for either frontend: `programs(sgl)` with
`import sgjax as sgl` or `import sglang as sgl` gives the same programs, so tests run them on every sgjax
backend (tests/test_lang.py) and under SGLang's own frontend against an sgjax server
(tests/e2e/test_sglang_client.py)."""

import json

def programs(lang):
    """The same programs written against either frontend (`lang`: the sglang or sgjax module)."""

    @lang.function
    def gens(s, topic):
        s += "Topic: " + topic + "\n"
        s += "A:" + lang.gen("a", max_tokens=6, temperature=0, ignore_eos=True) + "\n"
        s += "B:" + lang.gen("b", max_tokens=12, temperature=0, stop=["e", "\n"]) + "\n"
        s += "C:" + lang.gen("c", max_tokens=8, temperature=0, regex=r"[0-9]{3}")

    @lang.function
    def choose(s):
        s += "My favourite thing is " + lang.select("thing", choices=["cats", "dogs", "the quick brown fox"])

    @lang.function
    def branches(s):
        s += "Hello, my name is" + lang.gen("name", max_tokens=3, temperature=0, ignore_eos=True)
        forks = s.fork(2)
        for i, f in enumerate(forks):
            f += f" and {i}:"
        forks += lang.gen("more", max_tokens=4, temperature=0, ignore_eos=True)
        return [f["more"] for f in forks]

    @lang.function
    def chat(s, question):
        s += lang.user(question)
        s += lang.assistant(lang.gen("answer", max_tokens=6, temperature=0, ignore_eos=True))

    @lang.function
    def typed(s, name):
        # no max_tokens / temperature here: run()'s sampling arguments fill them in
        s += "Name: " + name + "\nAge: " + lang.gen("age", dtype=int, max_tokens=3) + "\n"
        s += "Height: " + lang.gen("height", dtype=float) + "\nTall: " + lang.gen("tall", dtype=bool) + "\n"
        s += "Count: " + lang.gen_int("count") + "\nCity: " + lang.gen_string("city", max_tokens=4) + "\n"
        s += "Record: " + lang.gen("record", max_tokens=24, json_schema=json.dumps({
            "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["id"],
            "additionalProperties": False}))

    @lang.function
    def scoped(s, question):
        with s.var_scope("turn"):
            s.user(question)
            with s.assistant():
                s += lang.gen("answer", max_tokens=4, ignore_eos=True)
        s += lang.user("Which?") + lang.assistant(lang.gen("pick", choices=["yes", "no", "maybe later"],
                                                           choices_method=lang.greedy_token_selection))
        forks = s.fork(2)
        forks += lambda i: f"Option {i}:" + lang.gen("option", max_tokens=3, ignore_eos=True)
        forks.join()

    @lang.function
    def told(s, topic):
        s += "Tell me about " + topic + ":" + lang.gen("story", return_logprob=True, return_text_in_logprobs=True)

    return gens, choose, branches, chat, typed, scoped, told


def agent_programs(lang):
    """Few-shot, tool use, ReAct and multi-turn chat: the programs of SGLang's examples, greedy, a few tokens
    each. Each returns what a test compares: the values its gens and selects produced, in order."""

    @lang.function
    def few_shot(s, question):
        s += "Answer with one word.\n"
        for q, a in (("Colour of grass?", "green"), ("Colour of snow?", "white")):
            s += "Q: " + q + "\nA: " + a + "\n"
        s += "Q: " + question + "\nA:" + lang.gen("answer", max_tokens=6, stop="\n", temperature=0)
        return [s["answer"]]

    tools = {"add": lambda a, b: a + b, "multiply": lambda a, b: a * b}

    @lang.function
    def tool_use(s, a, b):
        s += f"Tools: add, multiply.\nTask: combine {a} and {b}.\nTool: " + lang.select("tool", list(tools))
        result = tools[s["tool"]](a, b)  # the program's Python calls the tool the model chose
        s += f"\nResult: {result}\nSay it:" + lang.gen("say", max_tokens=4, temperature=0, ignore_eos=True)
        return [s["tool"], s["say"]]

    @lang.function
    def react(s, question):
        s += "Question: " + question + "\n"
        seen = []
        for step in range(2):
            s += f"Thought {step}:" + lang.gen("thought", max_tokens=5, stop="\n", temperature=0) + "\n"
            s += f"Action {step}: " + lang.select("action", ["search", "finish"]) + "\n"
            observation = f"result {step} for {question}" if s["action"] == "search" else "done"
            s += f"Observation {step}: {observation}\n"
            seen += [s["thought"], s["action"]]
        return seen

    @lang.function
    def multi_turn(s, questions):
        s += lang.system("Answer briefly.")
        answers = []
        for q in questions:
            s += lang.user(q)
            s += lang.assistant(lang.gen("answer", max_tokens=4, temperature=0, ignore_eos=True))
            answers.append(s["answer"])  # plain Python reads each answer before the next turn
        return answers

    return {"few_shot": (few_shot, {"question": "Colour of the sky?"}),
            "tool_use": (tool_use, {"a": 6, "b": 7}),
            "react": (react, {"question": "Where is Lyon?"}),
            "multi_turn": (multi_turn, {"questions": ["Hi?", "Why?"]})}
