"""A bare Flask endpoint served with the gateway's own gunicorn settings: the baseline of the
upload benchmark (what gunicorn + Flask cost without signature, validation and SQLite)."""

from flask import Flask, jsonify

app = Flask(__name__)


@app.post("/bare")
def bare() -> object:
    return jsonify({"success": True, "data": {"length": 0}})
