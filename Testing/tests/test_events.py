import io
import json

from medtl.events import EventSink, TerminalProgress, parse_line


def test_sink_writes_json_lines_to_stream_and_file(tmp_path):
    stream = io.StringIO()
    sink = EventSink(stream=stream, path=tmp_path / "events.jsonl")
    sink.emit("epoch", epoch=1, loss=0.25)
    sink.close()
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["loss"] == 0.25
    assert (tmp_path / "events.jsonl").read_text().strip() == line


def test_parse_line_ignores_logs():
    assert parse_line('{"event": "done", "x": 1}') == {"event": "done", "x": 1}
    assert parse_line("INFO something") is None
    assert parse_line("{broken") is None
    assert parse_line('{"no_event": 1}') is None


def test_terminal_progress_shows_loss_and_eta():
    out = io.StringIO()
    bar = TerminalProgress(out, live=True)
    bar({"event": "step", "step": 5, "total_steps": 10, "epoch": 1, "epochs": 2, "loss": 0.5, "eta_s": 75})
    bar({"event": "warning", "message": "CUDA requested but none"})
    text = out.getvalue()
    assert "50.0%" in text and "loss 0.5000" in text and "ETA  1m15s" in text
    assert "warning: CUDA requested but none" in text


def test_progress_in_a_log_file_is_one_line_per_epoch():
    out = io.StringIO()  # not a TTY
    bar = TerminalProgress(out)
    for step in range(1, 5):
        bar({"event": "step", "step": step, "total_steps": 4, "epoch": 1 + (step > 2), "epochs": 2, "loss": 0.3})
        if step % 2 == 0:
            bar({"event": "epoch", "step": step, "total_steps": 4, "epoch": step // 2, "epochs": 2, "loss": 0.3})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in out.getvalue()
    assert "epoch 1/2" in lines[0] and "100.0%" in lines[1]


def test_progress_shows_only_the_fields_an_event_has():
    out = io.StringIO()
    TerminalProgress(out, live=True)({"event": "step", "label": "predict", "step": 3, "total_steps": 6})
    text = out.getvalue()
    assert "50.0%" in text and "predict" in text
    assert "loss" not in text and "epoch" not in text and "ETA" not in text
