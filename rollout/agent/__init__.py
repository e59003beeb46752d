"""The agent loop: tool-call parsing, the tool API and built-in tools, their sandboxes."""
