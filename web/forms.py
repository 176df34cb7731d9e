"""Config forms as HTML built from a device type's JSON Schema (the device and bulk pages)."""

from __future__ import annotations

from typing import Any

from markupsafe import Markup, escape


def _resolve(root: dict[str, Any], sub: dict[str, Any]) -> dict[str, Any]:
    """Follow a local `$ref` (`#/$defs/x`), keeping the referring node's own keywords (its title)."""
    ref = sub.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return sub
    target: Any = root
    for part in ref[2:].split("/"):
        target = target[part]
    return {**_resolve(root, target), **{k: v for k, v in sub.items() if k != "$ref"}}


def config_form(schema_doc: dict[str, Any], values: Any, prefix: str = "configs",
                root: dict[str, Any] | None = None) -> Markup:
    """Form fields from a device type's JSON Schema: booleans as switches, integers as numbers,
    strings with their pattern; the field names are the dotted paths the API's errors name."""
    root = root or schema_doc
    out: list[str] = []
    for key, raw in _resolve(root, schema_doc).get("properties", {}).items():
        sub = _resolve(root, raw)
        path = f"{prefix}.{key}"
        value = values.get(key) if isinstance(values, dict) else None
        label = escape(f"{key} · {sub['title']}" if sub.get("title") else key)
        if sub.get("type") == "object":
            out.append(f'<fieldset><legend>{label}</legend>{config_form(sub, value, path, root)}</fieldset>')
            continue
        field_id = escape(path)
        if sub.get("type") == "boolean":
            checked = " checked" if value else ""
            inp = f'<input type="checkbox" id="{field_id}" name="{field_id}" data-kind="boolean"{checked}>'
        elif sub.get("type") == "integer":
            lo = f' min="{sub["minimum"]}"' if "minimum" in sub else ""
            hi = f' max="{sub["maximum"]}"' if "maximum" in sub else ""
            inp = (f'<input type="number" id="{field_id}" name="{field_id}" data-kind="integer" step="1"{lo}{hi} '
                   f'value="{escape("" if value is None else value)}" required>')
        else:
            pattern = f' pattern="{escape(sub["pattern"].strip("^$"))}"' if "pattern" in sub else ""
            inp = (f'<input type="text" id="{field_id}" name="{field_id}" data-kind="string"{pattern} '
                   f'value="{escape("" if value is None else value)}" required>')
        out.append(f'<div class="field"><label for="{field_id}">{label}</label>{inp}'
                   f'<span class="field-error" data-for="{field_id}" role="alert"></span></div>')
    return Markup("".join(out))
