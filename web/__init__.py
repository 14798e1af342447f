"""What the page and the API share at the HTTP level: who may do what (policy), the one door
every request passes (door), and the state folder that outlives a restart (state).

Knows HTTP and Confab's settings; no engine, and Gradio only where the door reads its login
cookie.
"""
