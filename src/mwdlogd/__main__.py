from mwdlogd.cli import main

raise SystemExit(main())
