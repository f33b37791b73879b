"""Operations of the supervisor target: deploy, status, logs, doctor and remove
over supervisord's XML-RPC API."""
