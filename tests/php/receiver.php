<?php
// A webhook receiver as amoCRM integrations write them: it reads the webhook through $_POST.
// Run as `php -S 127.0.0.1:PORT receiver.php`; each request's json_encode($_POST) is saved to
// $RECEIVER_DIR/<webhook-id>.json, where the test compares it with what amoCRM's docs show.
$dir = getenv('RECEIVER_DIR');
$id = $_SERVER['HTTP_WEBHOOK_ID'] ?? '';
if ($dir === false || !preg_match('/^[0-9a-f-]{36}$/', $id)) {
    http_response_code(400);
    echo 'no RECEIVER_DIR or no webhook-id';
    return;
}
$json = json_encode($_POST, JSON_UNESCAPED_UNICODE | JSON_UNESCAPED_SLASHES | JSON_THROW_ON_ERROR);
file_put_contents("$dir/$id.tmp", $json);
rename("$dir/$id.tmp", "$dir/$id.json");
echo 'ok';
