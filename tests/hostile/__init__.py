"""The hostile corpus: payloads and scripted model behaviours the bridge must survive (see cases.py)."""
