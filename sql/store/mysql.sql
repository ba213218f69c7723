-- provisioner user store schema for mysql.
-- Generated from provisioner/store/schema.py by `provisioner db ddl`; do not edit.

CREATE TABLE changes (
	id BIGINT NOT NULL AUTO_INCREMENT, 
	entity VARCHAR(16) NOT NULL, 
	entity_id INTEGER NOT NULL, 
	op VARCHAR(1) NOT NULL, 
	changed_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP, 
	CONSTRAINT pk_changes PRIMARY KEY (id)
)CHARSET=utf8mb4;

CREATE TABLE daemon_state (
	`key` VARCHAR(64) NOT NULL, 
	value VARCHAR(255) NOT NULL, 
	CONSTRAINT pk_daemon_state PRIMARY KEY (`key`)
)CHARSET=utf8mb4;

CREATE TABLE profiles (
	id INTEGER NOT NULL AUTO_INCREMENT, 
	name VARCHAR(64) NOT NULL, 
	description VARCHAR(1024) NOT NULL, 
	created_at DATETIME(6) NOT NULL, 
	updated_at DATETIME(6) NOT NULL, 
	CONSTRAINT pk_profiles PRIMARY KEY (id), 
	CONSTRAINT uq_profiles_name UNIQUE (name)
)CHARSET=utf8mb4;

CREATE TABLE users (
	id INTEGER NOT NULL AUTO_INCREMENT, 
	`role` VARCHAR(8) NOT NULL, 
	profile_id INTEGER, 
	username VARCHAR(64) NOT NULL, 
	username_key VARCHAR(64) NOT NULL, 
	full_name VARCHAR(128) NOT NULL, 
	email VARCHAR(254) NOT NULL, 
	description VARCHAR(1024) NOT NULL, 
	password_hash VARCHAR(255), 
	last_password_reset_at DATETIME(6), 
	extension VARCHAR(20) NOT NULL, 
	sip_realm VARCHAR(64) NOT NULL, 
	sip_md5 VARCHAR(32) NOT NULL, 
	sip_sha256 VARCHAR(64) NOT NULL, 
	transport VARCHAR(8) NOT NULL, 
	nat VARCHAR(16) NOT NULL, 
	codecs VARCHAR(64) NOT NULL, 
	context VARCHAR(79) NOT NULL, 
	call_group VARCHAR(255) NOT NULL, 
	pickup_group VARCHAR(255) NOT NULL, 
	video VARCHAR(8) NOT NULL, 
	disabled BOOL NOT NULL, 
	failed_logins INTEGER NOT NULL, 
	locked_at DATETIME(6), 
	failed_login_at DATETIME(6), 
	deleted_at DATETIME(6), 
	log_level VARCHAR(8), 
	messenger_sound BOOL NOT NULL, 
	toast_position VARCHAR(16) NOT NULL, 
	avatar LONGBLOB, 
	avatar_type VARCHAR(32), 
	apikey_hash VARCHAR(64), 
	apikey_created_at DATETIME(6), 
	created_at DATETIME(6) NOT NULL, 
	updated_at DATETIME(6) NOT NULL, 
	CONSTRAINT pk_users PRIMARY KEY (id), 
	CONSTRAINT ck_users_role CHECK (role IN ('admin', 'user')), 
	CONSTRAINT ck_users_transport CHECK (transport IN ('udp', 'tcp', 'tls', 'ws', 'wss')), 
	CONSTRAINT ck_users_nat CHECK (nat IN ('yes', 'no', 'force_rport', 'comedia', 'never', 'route')), 
	CONSTRAINT ck_users_video CHECK (video IN ('yes', 'no', 'always')), 
	CONSTRAINT ck_users_log_level CHECK (log_level IS NULL OR log_level IN ('error', 'warning', 'info', 'debug')), 
	CONSTRAINT ck_users_toast_position CHECK (toast_position IN ('top-right', 'top-left', 'top-center', 'bottom-right', 'bottom-left', 'bottom-center')), 
	CONSTRAINT ck_users_user_has_profile CHECK (role = 'admin' OR profile_id IS NOT NULL), 
	CONSTRAINT fk_users_profile_id_profiles FOREIGN KEY(profile_id) REFERENCES profiles (id) ON DELETE RESTRICT, 
	CONSTRAINT uq_users_username_key UNIQUE (username_key), 
	CONSTRAINT uq_users_extension UNIQUE (extension), 
	CONSTRAINT uq_users_apikey_hash UNIQUE (apikey_hash)
)CHARSET=utf8mb4;

CREATE TABLE registration_summary (
	user_id INTEGER NOT NULL, 
	server VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	device_state VARCHAR(32) NOT NULL, 
	problem VARCHAR(255) NOT NULL, 
	changed_at DATETIME(6) NOT NULL, 
	contacts LONGTEXT, 
	CONSTRAINT pk_registration_summary PRIMARY KEY (user_id, server), 
	CONSTRAINT fk_registration_summary_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE
)CHARSET=utf8mb4;

CREATE TABLE user_attributes (
	user_id INTEGER NOT NULL, 
	`key` VARCHAR(64) NOT NULL, 
	value VARCHAR(255) NOT NULL, 
	CONSTRAINT pk_user_attributes PRIMARY KEY (user_id, `key`), 
	CONSTRAINT fk_user_attributes_user_id_users FOREIGN KEY(user_id) REFERENCES users (id) ON DELETE CASCADE
)CHARSET=utf8mb4;

-- The change feed: every change to a user reaches the daemon.

CREATE TRIGGER trg_users_insert AFTER INSERT ON users FOR EACH ROW INSERT INTO changes (entity, entity_id, op) VALUES ('user', NEW.id, 'I');

CREATE TRIGGER trg_users_update AFTER UPDATE ON users FOR EACH ROW INSERT INTO changes (entity, entity_id, op) VALUES ('user', NEW.id, 'U');

CREATE TRIGGER trg_users_delete AFTER DELETE ON users FOR EACH ROW INSERT INTO changes (entity, entity_id, op) VALUES ('user', OLD.id, 'D');

CREATE TRIGGER trg_user_attributes_insert AFTER INSERT ON user_attributes FOR EACH ROW INSERT INTO changes (entity, entity_id, op) VALUES ('user', NEW.user_id, 'I');

CREATE TRIGGER trg_user_attributes_update AFTER UPDATE ON user_attributes FOR EACH ROW INSERT INTO changes (entity, entity_id, op) VALUES ('user', NEW.user_id, 'U');

CREATE TRIGGER trg_user_attributes_delete AFTER DELETE ON user_attributes FOR EACH ROW INSERT INTO changes (entity, entity_id, op) VALUES ('user', OLD.user_id, 'D');

CREATE TRIGGER trg_profiles_insert AFTER INSERT ON profiles FOR EACH ROW INSERT INTO changes (entity, entity_id, op) VALUES ('profile', NEW.id, 'I');

CREATE TRIGGER trg_profiles_update AFTER UPDATE ON profiles FOR EACH ROW INSERT INTO changes (entity, entity_id, op) VALUES ('profile', NEW.id, 'U');

CREATE TRIGGER trg_profiles_delete AFTER DELETE ON profiles FOR EACH ROW INSERT INTO changes (entity, entity_id, op) VALUES ('profile', OLD.id, 'D');

CREATE TRIGGER trg_users_key_change AFTER UPDATE ON users FOR EACH ROW INSERT INTO changes (entity, entity_id, op) SELECT 'user', OLD.id, 'U' FROM DUAL WHERE OLD.id <> NEW.id;

CREATE TRIGGER trg_user_attributes_key_change AFTER UPDATE ON user_attributes FOR EACH ROW INSERT INTO changes (entity, entity_id, op) SELECT 'user', OLD.user_id, 'U' FROM DUAL WHERE OLD.user_id <> NEW.user_id;

CREATE TRIGGER trg_profiles_key_change AFTER UPDATE ON profiles FOR EACH ROW INSERT INTO changes (entity, entity_id, op) SELECT 'profile', OLD.id, 'U' FROM DUAL WHERE OLD.id <> NEW.id;

CREATE TABLE alembic_version (
	version_num VARCHAR(32) NOT NULL, 
	PRIMARY KEY (version_num)
);

INSERT INTO alembic_version (version_num) VALUES ('0014');
