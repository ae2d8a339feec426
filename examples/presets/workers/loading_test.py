"""A worker written to the plain event protocol, as a third party would write it.

No task ids, no stdin: it reads its input from GPULANE_INPUT (if any), prints events with
print(json.dumps(...), flush=True), and exits. gpulane runs it unchanged as a one-off preset.
"""

import json
import os
import time

print(json.dumps({"event": "connection", "status": "connected"}), flush=True)
print(json.dumps({"event": "worker", "status": "loading", "message": "loading model"}),
      flush=True)
steps = int(os.environ.get("LOADING_STEPS", "3"))
raw = os.environ.get("GPULANE_INPUT") or "{}"
params = json.loads(raw) if raw.strip().startswith("{") else {}
delay = float(params.get("delay_ms", 10)) / 1000
if params.get("crash"):
    raise SystemExit("asked to crash")
words = []
for i in range(steps):
    time.sleep(delay)
    word = f"step{i + 1}"
    words.append(word)
    print(json.dumps({"event": "text_delta", "delta": word + " "}), flush=True)
text = " ".join(words)
print(json.dumps({"event": "text", "content": text}), flush=True)
print(json.dumps({"event": "finish", "status": "completed"}), flush=True)
