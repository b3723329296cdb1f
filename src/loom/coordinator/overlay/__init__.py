"""The coordinator as the overlay's authority (issue 10; docs/overlay.md).

- :mod:`.authority`: the Nebula CA (key 0600 in the data dir, never sent anywhere), the
  overlay address of every member, and one short-lived certificate per member;
- :mod:`.lighthouse`: the supervised lighthouse + relay Nebula process;
- :mod:`.service`: what the rest of the coordinator calls (install at start-up, a grant
  for each ``member.start``, release at teardown, the status fields).
"""
