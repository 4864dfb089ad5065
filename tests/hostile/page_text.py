"""Text a viewer controls (display name, a fact, a chat line, a task id) that must show on the
console as text: never as markup, never running, never flipping or breaking the page around it.
Used by tests/unit/test_console.py (every string escaped, the page's tag structure unchanged) and
the browser test (no script ran, no element appeared)."""

HOSTILE_TEXT = [
    "<script>window.__pwned=1</script>",
    "<img src=x onerror=\"window.__pwned=1\">",
    "\"><svg onload=window.__pwned=1>",
    "</td></tr></table><h1>fake heading</h1>",
    "'; alert(1); //",
    "{{ 7*7 }} {% raw %}",
    "javascript:alert(1)",
    "<a href=\"javascript:alert(1)\">click</a>",
    "<style>body{display:none}</style>",
    "<!-- unclosed comment",
    "<textarea>",
    "&lt;b&gt;already escaped&lt;/b&gt; &amp;",
    "\u202eevil\u202c right-to-left override",
    "\u2067isolate\u2069 \u200f\u200e marks",
    "zero\u200bwidth\u200c\u200djoiner\ufeff",
    "ﾟ･✿ヾ╲(｡◕‿◕｡)╱✿･ﾟ 小明 🐱",
    "x" * 300,
]
