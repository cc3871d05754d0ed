"""Running Spillway rather than using it: a whole stack on one machine (`stack`), the demo, and
the HTTP service (`serve`). Scripts and web backends import `producer`, never this."""
