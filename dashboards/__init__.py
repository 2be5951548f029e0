"""Live dashboards: pages, the WebSocket consumers and the event bus that feeds them."""
