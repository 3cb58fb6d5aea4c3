"""The service's routes, one router per resource; `app.create_app` includes them all."""
