"""The web pages the Bento serves: /ui (`ui`, the inspection page) and /review (`review`),
each a self-contained HTML file beside its Starlette app (no CDN, CSP by hash).

May import: `defectflow.serving` and what it may import.
"""
