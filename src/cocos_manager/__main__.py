"""`python -m cocos_manager`: the same command as `cocos-manager`."""

from cocos_manager.main import main

raise SystemExit(main())
